"""Tasks by name (tasks.md §2), sample generation with length fitting and caching, and scoring.

The harness reaches tasks only through this module, so a new task is one module plus one
registry entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kvbench.tasks.datasets import catalog
from kvbench.tasks.errors import TaskError
from kvbench.tasks.fingerprint import chat_template_sha256, derive_seed, tokenizer_id, vocab_sha256
from kvbench.tasks.generated import chain, cwe, fwe, niah, passkey, perplexity, reconstruction, vt
from kvbench.tasks.generated import sample_cache as cache
from kvbench.tasks.generated.fitting import Fitter, Setup, UnitPlan
from kvbench.tasks.generated.haystacks import haystack_sha256
from kvbench.tasks.generated.niah import NiahVariant
from kvbench.tasks.generated.words import wonderwords_version
from kvbench.tasks.metrics.scoring import BENCHMARK_METRICS, METRICS
from kvbench.tasks.sample import Sample

# Bump whenever a change to any generator alters the samples it produces: it keys the cache.
GENERATOR_VERSION = "2"


@dataclass(frozen=True)
class TaskSpec:
    """A generatable task: what it asks, how long answers are, how they are scored, how it grows."""

    name: str
    description: str
    max_new_tokens: int
    metric: str
    haystack: str
    plan: Callable[[Setup], UnitPlan]
    # Further metrics reported on the same output, one result row each (e.g. BERTScore next to ROUGE-L).
    extra_metrics: tuple[str, ...] = ()


def _niah(name: str, description: str, variant: NiahVariant) -> TaskSpec:
    return TaskSpec(name, description, 128, "string_match_all", variant.haystack, partial(niah.plan, variant))


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _niah("niah_single_1", "one word-keyed number among noise sentences", NiahVariant("noise", "words", "numbers")),
        _niah("niah_single_2", "one word-keyed number in essay prose", NiahVariant("essay", "words", "numbers")),
        _niah("niah_single_3", "one word-keyed UUID in essay prose", NiahVariant("essay", "words", "uuids")),
        _niah(
            "niah_multikey_1",
            "one of four word-keyed numbers in essay prose",
            NiahVariant("essay", "words", "numbers", num_keys=4),
        ),
        _niah(
            "niah_multikey_2",
            "one word-keyed number among lines that are all needles",
            NiahVariant("needle", "words", "numbers"),
        ),
        _niah(
            "niah_multikey_3",
            "one UUID-keyed UUID among lines that are all needles",
            NiahVariant("needle", "uuids", "uuids"),
        ),
        _niah(
            "niah_multivalue",
            "all four numbers stored under one word key in essay prose",
            NiahVariant("essay", "words", "numbers", num_values=4),
        ),
        _niah(
            "niah_multiquery",
            "the numbers of four word keys in essay prose",
            NiahVariant("essay", "words", "numbers", num_queries=4),
        ),
        TaskSpec(
            name="vt",
            description="follow a four-hop chain of variable assignments hidden in noise",
            max_new_tokens=30,
            metric="string_match_all",
            haystack="noise",
            plan=vt.plan,
        ),
        TaskSpec(
            name="cwe",
            description="name the ten most repeated words of a numbered word list",
            max_new_tokens=120,
            metric="string_match_all",
            haystack="word_list",
            plan=cwe.plan,
        ),
        TaskSpec(
            name="fwe",
            description="name the three most frequent words of a Zipf-distributed coded text",
            max_new_tokens=50,
            metric="string_match_all",
            haystack="coded_words",
            plan=fwe.plan,
        ),
        TaskSpec(
            name="passkey",
            description="repeat a five-digit pass key hidden among noise sentences",
            max_new_tokens=16,
            metric="passkey_exact",
            haystack="noise",
            plan=passkey.plan,
        ),
        TaskSpec(
            name="reconstruction",
            description="repeat a marked 40-word passage of an essay document (ROUGE-1/2/L, BERTScore)",
            max_new_tokens=96,
            metric="rougeL",
            haystack="essay",
            plan=reconstruction.plan,
            extra_metrics=("rouge1", "rouge2", "bertscore_f1"),
        ),
        TaskSpec(
            name="chain",
            description="track a number through a list of additions and subtractions, one answer line per step",
            max_new_tokens=0,  # per sample: the answer's own length (`Fitter.allowance`)
            metric="chain_steps",
            haystack="arithmetic",
            plan=chain.plan,
            extra_metrics=("chain_operations",),
        ),
        TaskSpec(
            name="perplexity",
            description="perplexity of the next 256 tokens of an essay text after the compressed context",
            max_new_tokens=perplexity.CONTINUATION_TOKENS,
            metric="perplexity",
            haystack="essay",
            plan=perplexity.plan,
        ),
    )
}

# Report averages over a named set (tasks.md §11.5); qa_1/qa_2 need downloads and are omitted.
TASK_SETS: dict[str, tuple[str, ...]] = {
    "RULER-11 offline": tuple(
        name for name in TASKS if name not in ("passkey", "reconstruction", "perplexity", "chain")
    ),
}


def list_tasks() -> list[tuple[str, str]]:
    """(name, one-line description) of every generatable task."""
    return [(spec.name, spec.description) for spec in TASKS.values()]


def is_dataset_task(name: str) -> bool:
    """A task read from a data set (`longbench:hotpotqa`, `longbench_v2`) rather than generated."""
    return catalog.is_dataset_task(name)


def check_task(name: str) -> None:
    """A TaskError naming the valid choices for an unknown generated task, data set or subset."""
    if catalog.is_dataset_task(name):
        catalog.parse_task(name)
    else:
        get_task(name)


def locate_dataset(task: str, data: Mapping[str, Path], length: int | None = None) -> catalog.Located:
    """Where a data-set task's records are; one line naming every place looked and `kvbench data fetch` if none."""
    located, looked = catalog.locate(task, data, length)
    if located is None:
        raise TaskError(catalog.missing_message(task, looked))
    return located


def list_dataset_tasks(data: Mapping[str, Path] | None = None) -> list[tuple[str, str, str | None]]:
    """(task, description, where its records are or None) for every data-set task with a fixed subset list; the
    Hugging Face cache is not consulted here (`kvbench list tasks` stays fast): only --data and kvbench's copies."""
    out = []
    for spec in catalog.DATASETS.values():
        names = [spec.name] if not spec.takes_subset else [f"{spec.name}:{s}" for s in spec.subsets or ()]
        for name in names:
            located, _ = catalog.locate(name, data or {}, None, hub=False)
            out.append((name, spec.description, located.where if located else None))
    return out


def get_task(name: str) -> TaskSpec:
    """The spec of `name`; a TaskError that lists the valid names otherwise."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _identity(spec: TaskSpec, tokenizer: Any, length: int, seed: int, query_aware: bool) -> dict[str, Any]:
    """Everything the samples depend on: recorded in each sample and keying the cache."""
    return {
        "generator_version": GENERATOR_VERSION,
        "task": spec.name,
        "target_length": length,
        "seed": seed,
        "query_aware": query_aware,
        "tokenizer": tokenizer_id(tokenizer),
        "vocab_sha256": vocab_sha256(tokenizer),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "haystack": spec.haystack,
        "haystack_sha256": haystack_sha256(spec.haystack),
        "wonderwords_version": wonderwords_version(),
    }


def generate_samples(
    task: str,
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 42,
    query_aware: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """`num_samples` samples of `task`, each fitted to `length` tokens with `tokenizer`.

    Sample i is drawn from Random(SHA-256(seed, task, length, i)), so it does not depend on
    how many samples are requested. `query_aware` must match how the harness will split the
    prompt: it moves the question into the context, which changes the token count.
    """
    spec = get_task(task)
    if length <= 0 or num_samples <= 0:
        raise TaskError(f"length and num_samples must be positive, got {length} and {num_samples}")
    identity = _identity(spec, tokenizer, length, seed, query_aware)
    key = {**identity, "num_samples": num_samples}
    if cache_dir is not None:
        cached = cache.load(cache_dir, key)
        if cached is not None:
            return cached

    setup = Setup(tokenizer, spec.name, length, seed, spec.max_new_tokens, query_aware)
    plan = spec.plan(setup)
    fitter = Fitter(setup)
    start = fitter.search(plan, derive_seed(seed, spec.name, length, "search"))
    samples = []
    for index in range(num_samples):
        fitted = fitter.fit(plan, derive_seed(seed, spec.name, length, index), start)
        draft = fitted.draft
        metadata = {
            **{name: value for name, value in identity.items() if name != "task"},
            "length": fitted.length,
            "num_units": fitted.units,
            "increment": plan.increment,
            **draft.metadata,
        }
        samples.append(
            Sample(
                task=spec.name,
                sample_id=index,
                context=draft.context,
                question=draft.question,
                answer_prefix=draft.answer_prefix,
                references=list(draft.references),
                max_new_tokens=fitter.allowance(draft),
                metric=spec.metric,
                metadata=metadata,
            )
        )
    if cache_dir is not None:
        cache.store(cache_dir, key, samples)
    return samples


def row_metrics(sample: Sample) -> list[str]:
    """Every metric reported for the sample: its own first, then its task's extra metrics."""
    spec = TASKS.get(sample.task)
    return [sample.metric, *(spec.extra_metrics if spec is not None and spec.metric == sample.metric else ())]


def score_metric(sample: Sample, output_text: str, metric: str) -> float:
    """One named metric of a raw generation against the sample's references, in [0, 1]; the data sets' own
    metrics also get the sample's `metric_options` (LongBench's first-line rule, trec's classes)."""
    if metric in BENCHMARK_METRICS:
        return BENCHMARK_METRICS[metric](output_text, sample.references, **sample.metadata.get("metric_options", {}))
    return METRICS[metric](output_text, sample.references)


def score(sample: Sample, output_text: str) -> float:
    """The sample's metric on a raw generation, in [0, 1]."""
    return score_metric(sample, output_text, sample.metric)

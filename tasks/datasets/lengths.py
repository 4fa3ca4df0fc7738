"""Real samples at their own lengths: measured with the model's tokenizer, capped by truncating the middle of the
context (as LongBench's pred.py truncates an over-long prompt: first half and last half kept) or skipped, and the
needle-in-a-haystack grid (depth x length) built over an essay haystack.

A sample's measured length is its prompt as it will be run (chat template, question, answer prefix) plus its
generation allowance, as RULER counts it; `metadata["sample_tokens"]` records it as run (`truncated_from` the
length before truncation). A long-generation sample (AIME25, MATH500: a short problem, thousands of tokens of
answer) is fitted by shrinking its generation allowance instead of cutting its prompt (`max_new_tokens_from`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvbench.tasks.datasets import catalog
from kvbench.tasks.errors import TaskError
from kvbench.tasks.prompting import split_prompt
from kvbench.tasks.sample import Sample

OVER_LENGTH = ("truncate", "skip")
NEEDLE_MAX_NEW_TOKENS = 100


def sample_prompt(tokenizer: Any, sample: Sample, query_aware: bool = False):
    """The sample's prompt split as the pipeline runs it; LongBench's few-shot and code subsets without the chat
    template (`metadata["chat_template"]` False)."""
    return split_prompt(
        tokenizer,
        sample.context,
        sample.question,
        sample.answer_prefix,
        query_aware=query_aware,
        chat_template=sample.metadata.get("chat_template", True),
    )


def measure(tokenizer: Any, sample: Sample, query_aware: bool = False) -> int:
    parts = sample_prompt(tokenizer, sample, query_aware)
    return len(parts.context_ids) + len(parts.question_ids) + sample.max_new_tokens


def _middle(tokenizer: Any, text: str, keep: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if keep >= len(ids):
        return text
    head = keep // 2
    return tokenizer.decode(ids[:head], skip_special_tokens=True) + tokenizer.decode(
        ids[len(ids) - (keep - head) :], skip_special_tokens=True
    )


def truncate_middle(tokenizer: Any, sample: Sample, cap: int, query_aware: bool = False) -> Sample | None:
    """The sample with the middle of its context cut so that it measures at most `cap` tokens; None when even an
    empty context does not fit."""
    total = measure(tokenizer, sample, query_aware)
    if total <= cap:
        return sample
    context_tokens = len(tokenizer.encode(sample.context, add_special_tokens=False))
    keep = context_tokens - (total - cap)
    while keep > 0:
        cut = replace(sample, context=_middle(tokenizer, sample.context, keep))
        excess = measure(tokenizer, cut, query_aware) - cap
        if excess <= 0:
            return cut
        keep -= max(excess, 1)  # decoding and re-encoding can merge or split tokens at the cut
    return None


def shorten_generation(sample: Sample, metadata: dict[str, Any], tokens: int, cap: int) -> Sample:
    """A long-generation sample (AIME25, MATH500) over `cap`: its generation allowance shrunk to what the cap leaves
    after the prompt (`max_new_tokens_from` keeps the original); skipped if the prompt alone does not fit. The
    prompt (the problem) is never cut."""
    prompt = tokens - sample.max_new_tokens
    if prompt >= cap:
        metadata["skipped"] = f"prompt of {prompt} tokens leaves no room to generate under the {cap}-token cap"
        return replace(sample, metadata=metadata)
    metadata.update({"max_new_tokens_from": sample.max_new_tokens, "sample_tokens": cap})
    return replace(sample, max_new_tokens=cap - prompt, metadata=metadata)


def fit_samples(
    samples: list[Sample], tokenizer: Any, cap: int | None, over_length: str = "truncate", query_aware: bool = False
) -> list[Sample]:
    """Every sample measured (`sample_tokens`); over `cap`, middle-truncated (`truncated_from`) or marked
    `skipped` with its reason, per `over_length`; a long-generation sample's allowance shrinks instead
    (`shorten_generation`)."""
    if over_length not in OVER_LENGTH:
        raise TaskError(f"--over-length {over_length!r}: choose one of {', '.join(OVER_LENGTH)}")
    fitted = []
    for sample in samples:
        tokens = measure(tokenizer, sample, query_aware)
        metadata = {**sample.metadata, "sample_tokens": tokens}
        if cap is None or tokens <= cap:
            fitted.append(replace(sample, metadata=metadata))
            continue
        if sample.metadata.get("long_generation") and over_length == "truncate":
            fitted.append(shorten_generation(sample, metadata, tokens, cap))
            continue
        cut = truncate_middle(tokenizer, sample, cap, query_aware) if over_length == "truncate" else None
        if cut is None:
            why = "over" if over_length == "skip" else "cannot be truncated to"
            metadata["skipped"] = f"sample of {tokens} tokens {why} the {cap}-token cap (--over-length {over_length})"
            fitted.append(replace(sample, metadata=metadata))
        else:
            metadata["truncated_from"] = tokens
            fitted.append(replace(cut, metadata={**metadata, "sample_tokens": measure(tokenizer, cut, query_aware)}))
    return fitted


def needle_depths(count: int) -> list[float]:
    """`count` depths evenly spaced over [0, 100] percent (50 for one)."""
    if count == 1:
        return [50.0]
    return [round(100 * i / (count - 1), 2) for i in range(count)]


def needle_grid(
    records: list[dict[str, Any]], tokenizer: Any, length: int, count: int, where: str, query_aware: bool = False
) -> list[Sample]:
    """One sample per depth at this length: the essays (repeated if short) cut to fit `length` tokens with the
    needle inserted at the sentence boundary before its depth (kvpress's needle in a haystack)."""
    if not records:
        raise TaskError(f"{where}: no essays")
    first = records[0]
    needle = str(catalog._field(first, "needle", where)).strip()
    question = str(catalog._field(first, "question", where))
    answer_prefix = str(first.get("answer_prefix") or "")
    max_new = int(first.get("max_new_tokens") or NEEDLE_MAX_NEW_TOKENS)
    essays = " ".join(str(catalog._field(r, "context", where)) for r in records)
    haystack = tokenizer.encode(essays, add_special_tokens=False)
    samples = []
    for index, depth in enumerate(needle_depths(count)):
        probe = Sample("needle:essays", index, needle, question, answer_prefix, [needle], max_new, "needle_rougeL")
        budget = length - measure(tokenizer, probe, query_aware)
        while budget > 0:
            ids = (haystack * (budget // max(len(haystack), 1) + 1))[:budget]
            at = int(len(ids) * depth / 100)
            head = tokenizer.decode(ids[:at], skip_special_tokens=True)
            tail = tokenizer.decode(ids[at:], skip_special_tokens=True)
            boundary = head.rfind(". ")
            if boundary >= 0 and depth < 100:
                head, tail = head[: boundary + 1], head[boundary + 1 :] + tail
            context = f"{head.rstrip()} {needle} {tail.lstrip()}".strip()
            sample = replace(
                probe,
                context=context,
                metadata={"depth": depth, "dataset": "needle", "source": where, "context_id": index},
            )
            excess = measure(tokenizer, sample, query_aware) - length
            if excess <= 0:
                sample.metadata["sample_tokens"] = measure(tokenizer, sample, query_aware)
                samples.append(sample)
                break
            budget -= excess
        else:
            raise TaskError(f"needle:essays: length {length} leaves no room for a haystack")
    return samples


def dataset_samples(
    task: str,
    tokenizer: Any,
    cap: int | None,
    num_samples: int,
    data: Mapping[str, Path],
    over_length: str = "truncate",
    query_aware: bool = False,
) -> list[Sample]:
    """The first `num_samples` samples of a data-set task (for kvpress rows: of its questions), measured and fitted
    to `cap`; the needle grid has `num_samples` depths at length `cap`."""
    located, looked = catalog.locate(task, data, cap)
    if located is None:
        raise TaskError(catalog.missing_message(task, looked))
    records = catalog.read_records(located)
    if task.startswith("needle:"):
        if cap is None:
            raise TaskError("needle:essays needs --lengths (the grid's context lengths)")
        return needle_grid(records, tokenizer, cap, num_samples, located.where, query_aware)
    samples = catalog.records_to_samples(task, records, located.where)[:num_samples]
    return fit_samples(samples, tokenizer, cap, over_length, query_aware)

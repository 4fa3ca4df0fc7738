"""`kvbench run`: tasks × lengths × samples, one prefill per sample, every (method, budget) from it.

Everything a user can get wrong is checked before the model loads; each finished cell is one row in the
store at once, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tqdm import tqdm

from kvbench.harness.artifacts.calibration import calibration_available, ensure_calibrated
from kvbench.harness.engine.batched_settings import DEFAULT_BATCH_SIZE, check_batch_size
from kvbench.harness.engine.pipeline import CellResult, iter_context_cells
from kvbench.harness.engine.scoring_cells import ScoredCell, iter_scoring_cells
from kvbench.harness.engine.shared_context import iter_shared_context_cells
from kvbench.harness.errors import KVBenchError
from kvbench.harness.files import now
from kvbench.harness.models.loading import LoadedModel, load_model, model_max_length, resolve_device, resolve_dtype
from kvbench.harness.models.loading import _locate as locate_model
from kvbench.harness.provenance import (
    ATTENTION_BACKEND,
    cell_identity,
    chat_template_policy,
    git_commit,
    identity_hash,
    model_fingerprint,
    provenance,
)
from kvbench.harness.requirements import installed_version
from kvbench.harness.runner.lists import distinct
from kvbench.harness.runner.ray_runner import CONNECT_TIMEOUT_S
from kvbench.harness.runner.store import ResultStore, cell_key
from kvbench.harness.token_budget import budget_label, budget_tokens, parse_budget
from kvbench.methods import Method, get_method
from kvbench.tasks import (
    GENERATOR_VERSION,
    Sample,
    check_task,
    dataset_samples,
    generate_samples,
    is_dataset_task,
    locate_dataset,
    row_metrics,
    sample_prompt,
    score_metric,
    token_split,
)
from kvbench.tasks.fingerprint import derive_seed


@dataclass
class SweepSpec:
    model: str
    methods: list[str]
    budgets: list[float]
    tasks: list[str]
    lengths: list[int]
    samples: int
    out: Path
    seed: int = 42
    query_aware: bool = False
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False
    command: str = ""
    sample_cache: Path | None = field(default=None)
    # Cells of one sample decoded together (harness/engine/batched_decode.py); 1 decodes each alone, the reference path.
    batch_size: int = DEFAULT_BATCH_SIZE
    # More than one worker, or a cluster address, spreads the work units over Ray actors (harness/runner/ray_runner.py).
    workers: int | None = 1
    ray_address: str | None = None
    ray_timeout: float = CONNECT_TIMEOUT_S  # seconds the cluster's address may take to answer
    # Data-set tasks (`longbench:hotpotqa`): local copies by data set name (`--data NAME=PATH`), and what to do with
    # a sample over the length cap (`truncate` its context's middle, or `skip` it, counted as skipped rows).
    data: dict[str, Path] = field(default_factory=dict)
    over_length: str = "truncate"


def default_sample_cache() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench")) / "samples"


def validate(spec: SweepSpec) -> list[Method]:
    """Check every user input that needs no model; return the methods to run, one per distinct configuration (two
    specs of one configuration are one cell: said on stderr)."""
    methods = distinct(spec.methods, "methods", get_method, key=lambda method: method.label)
    for budget in spec.budgets:
        parse_budget(budget)
    for task in spec.tasks:
        check_task(task)
        if not spec.lengths and not is_dataset_task(task):
            raise KVBenchError(f"task {task} is generated to a length: give --lengths")
    for task in spec.tasks:  # a data set not on disk is one line before the model loads
        if is_dataset_task(task):
            for length in spec.lengths or [None]:
                locate_dataset(task, spec.data, length)
    if spec.samples < 1:
        raise KVBenchError(f"--samples {spec.samples} must be at least 1")
    check_batch_size(spec.batch_size)
    resolve_dtype(spec.dtype, resolve_device(spec.device))
    return methods


def run_identity(spec: SweepSpec) -> dict[str, Any]:
    """What every row of this run shares and a resumed store must match, known before the model loads: the
    model and its weights' fingerprint, dtype, device, attention backend, task generator version, seed and
    query-aware. Where the weights lie is not part of it (the same weights elsewhere are the same model): rows
    record it as `model_source`."""
    device = resolve_device(spec.device)
    location, gguf_file = locate_model(spec.model)
    return {
        "model": spec.model,
        "model_fingerprint": model_fingerprint(location, gguf_file),
        "dtype": str(resolve_dtype(spec.dtype, device)).removeprefix("torch."),
        "device": device.type,
        "attention_backend": ATTENTION_BACKEND,
        "task_generator_version": GENERATOR_VERSION,
        "seed": spec.seed,
        "query_aware": spec.query_aware,
    }


def invocation_record(spec: SweepSpec) -> dict[str, Any]:
    return {"command": spec.command, **provenance(), "started_at": now(), "finished_at": None}


def run_metadata(spec: SweepSpec, loaded: LoadedModel, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "model": spec.model,
        "model_source": loaded.source,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "attention_backend": ATTENTION_BACKEND,
        "versions": {
            "kvbench": installed_version("kvbench"),
            "torch": installed_version("torch"),
            "transformers": installed_version("transformers"),
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "command": spec.command,
        "seed": spec.seed,
        "samples": spec.samples,
        "tasks": spec.tasks,
        "lengths": spec.lengths,
        "methods": spec.methods,
        "budgets": spec.budgets,
        "query_aware": spec.query_aware,
        "identity": identity,
        "started_at": now(),
        "finished_at": None,
    }


def method_identities(
    methods: list[Method], identity: dict[str, Any], tokenizer
) -> dict[str, tuple[dict[str, Any], str]]:
    """Per method label: the cell identity its rows carry (the run's, the chat-template policy, the method's
    full config and artifact fingerprint) and its hash."""
    shared = {**identity, "chat_template": chat_template_policy(tokenizer)}
    out = {}
    for method in methods:
        cell = cell_identity(shared, method)
        out[method.label] = (cell, identity_hash(cell))
    return out


def calibrate_checked(
    loaded: LoadedModel, methods: list[Method], store: ResultStore, identity: dict[str, Any], force: bool
) -> tuple[dict[str, Path | None], dict[str, tuple[dict[str, Any], str]]]:
    """Calibrate what needs it and refuse a store of other identities, checking before any slow work what can be:
    the methods that need no calibration or only load theirs (a cached artifact, `checkpoint=`) are compared with
    the store first, so that a stale row of one of them is refused before another method trains for minutes. A
    method that calibrates now is compared after: its artifact's fingerprint is known only once it exists."""
    ready = [m for m in methods if calibration_available(loaded, m)]
    calibrated = {m.label: ensure_calibrated(loaded, m) for m in ready if m.needs_calibration}
    refuse_mixed_identities(store, method_identities(ready, identity, loaded.tokenizer), force)
    for method in methods:
        if method.needs_calibration and method.label not in calibrated:
            calibrated[method.label] = ensure_calibrated(loaded, method)
    identities = method_identities(methods, identity, loaded.tokenizer)
    refuse_mixed_identities(store, identities, force)
    return calibrated, identities


def refuse_mixed_identities(store: ResultStore, identities: dict[str, tuple[dict[str, Any], str]], force: bool) -> None:
    """A store never mixes identities silently: rows of a method label computed under another identity (another
    config default, artifact, chat template, or rows from before identities were recorded) are refused in one
    line, or dropped with --force."""
    stale: dict[str, int] = {}
    for row in store.rows():
        label = row.get("method_label", row["method"])
        if label in identities and row.get("identity_hash") != identities[label][1]:
            stale[label] = stale.get(label, 0) + 1
    if not stale:
        return
    if not force:
        described = ", ".join(f"{count} rows of {label}" for label, count in stale.items())
        raise KVBenchError(
            f"{store.directory} holds {described} computed with another configuration, algorithm version, artifact or chat template "
            "(or recorded without an identity); use another --out or --force to recompute them"
        )
    store.drop_rows(
        lambda row: (
            row.get("method_label", row["method"]) in stale
            and row.get("identity_hash") != identities[row.get("method_label", row["method"])][1]
        )
    )


def cells_for(methods: list[Method], budgets: list[float]) -> list[tuple[Method, float]]:
    """Every (method, budget); a method that ignores the budget runs once, at 1.0."""
    cells = []
    for method in methods:
        for budget in budgets if method.uses_budget else [1.0]:
            cells.append((method, budget))
    return cells


@dataclass
class RowContext:
    """What every row of this sweep carries besides its measurement: identities per method label, provenance."""

    spec: SweepSpec
    identities: dict[str, tuple[dict[str, Any], str]]
    provenance: dict[str, Any]

    def method_fields(self, method: Method) -> dict[str, Any]:
        identity, digest = self.identities[method.label]
        return {
            "method": method.name,
            "method_label": method.label,
            "method_config": identity["method_config"],
            "artifact": identity["artifact"],
            "method_bytes": method.method_bytes(),
            "identity": identity,
            "identity_hash": digest,
            **self.provenance,
        }


def sample_seed(spec: SweepSpec, sample: Sample, length: int) -> int:
    """The seed methods that draw random numbers get for this sample: from the run seed and the sample."""
    return derive_seed(spec.seed, sample.task, length, sample.sample_id) & (2**63 - 1)


def token_fields(budget: float) -> dict[str, Any]:
    """A token budget's rows say so (`budget` is then its token count): `budget_tokens` is part of the cell's
    identity, so `0.25` and `256t` never share a cell. Fractional rows carry nothing new, so older stores resume."""
    tokens = budget_tokens(budget)
    return {} if tokens is None else {"budget": float(tokens), "budget_tokens": tokens}


def _generation_fields(outcome: CellResult) -> dict[str, Any]:
    """What the cache held over the answer: at the end and (tokens generated, bytes held) along the way, and the
    decode speed (generated tokens over the decode's seconds: the question's forward included, and in a decode
    batch the row's share of the batch's time)."""
    speed = outcome.new_tokens / outcome.decode_s if outcome.decode_s > 0 else None
    return {
        "kv_bytes_final": outcome.kv_bytes_final,
        "kv_trace": outcome.kv_trace,
        "decode_tokens_per_s": round(speed, 3) if speed is not None else None,
    }


def _measured(outcome: CellResult | ScoredCell) -> dict[str, Any]:
    return {
        "kv_bytes": outcome.kv_bytes,
        "kv_bytes_full": outcome.kv_bytes_full,
        "kv_ratio": round(outcome.kv_ratio, 6),
        "kv_bytes_peak": outcome.kv_bytes_peak,
        "prefill_s": round(outcome.prefill_s, 4),
        "compress_s": round(outcome.compress_s, 4),
        "prefill_peak_memory_bytes": outcome.prefill_peak_memory_bytes,
        "decode_peak_memory_bytes": outcome.decode_peak_memory_bytes,
        "head_spread": outcome.head_spread,
    }


def _row(
    sample: Sample,
    length: int,
    method: Method,
    budget: float,
    outcome: CellResult | KVBenchError,
    parts,
    context: RowContext,
    metric: str,
):
    depths = sample.metadata.get("depths") or ([sample.metadata["depth"]] if "depth" in sample.metadata else [])
    data_fields = {
        key: sample.metadata[key]
        for key in (
            "dataset",
            "source",
            "context_id",
            "turn",
            "sample_tokens",
            "truncated_from",
            "max_new_tokens_from",
            "source_length",
            "difficulty",
            "length_class",
        )
        if sample.metadata.get(key) is not None
    }
    row = {
        "task": sample.task,
        "length": length,
        "sample_id": sample.sample_id,
        **context.method_fields(method),
        "budget": budget,
        **token_fields(budget),
        "metric": metric,
        "references": sample.references,
        "context_tokens": len(parts.context_ids),
        "question_tokens": len(parts.question_ids),
        "depth": float(depths[0]) if depths else None,
        "query_aware": context.spec.query_aware,
        "seed": context.spec.seed,
        **data_fields,
    }
    if isinstance(outcome, KVBenchError):
        return {**row, "score": None, "error": str(outcome)}
    return {
        **row,
        "score": round(100 * score_metric(sample, outcome.output, metric), 2),
        "output": outcome.output,
        **_measured(outcome),
        "decode_s": round(outcome.decode_s, 4),
        "decode_batch": outcome.decode_batch,
        "new_tokens": outcome.new_tokens,
        "stopped_by": outcome.stopped_by,
        **_generation_fields(outcome),
    }


def _perplexity_row(
    sample: Sample,
    length: int,
    method: Method,
    budget: float,
    outcome: ScoredCell | KVBenchError,
    context_ids: list[int],
    continuation_ids: list[int],
    context: RowContext,
):
    """A perplexity cell (lower is better): nothing is generated, so there is no output and no new token;
    decode_s is the teacher-forced scoring pass over the reference."""
    row = {
        "task": sample.task,
        "length": length,
        "sample_id": sample.sample_id,
        **context.method_fields(method),
        "budget": budget,
        **token_fields(budget),
        "metric": sample.metric,
        "references": sample.references,
        "context_tokens": len(context_ids),
        "question_tokens": 0,
        "scored_tokens": len(continuation_ids),
        "depth": None,
        "query_aware": context.spec.query_aware,
        "seed": context.spec.seed,
    }
    if isinstance(outcome, KVBenchError):
        return {**row, "score": None, "error": str(outcome)}
    (scored,) = outcome.scores
    return {
        **row,
        "score": round(scored.perplexity, 4),
        **_measured(outcome),
        "decode_s": round(outcome.score_s, 4),
        "new_tokens": 0,
    }


def _skipped_rows(samples: list[Sample], length: int, todo, context: RowContext):
    for method, budget in todo:
        refusal = KVBenchError(samples[0].metadata["skipped"])
        # Never prefilled: the rows' token counts are zero and `sample_tokens` says how long the sample was.
        unrun = SimpleNamespace(context_ids=(), question_ids=())
        rows = [
            {**_row(s, length, method, budget, refusal, unrun, context, m), "skipped": True}
            for s in samples
            for m in row_metrics(s)
        ]
        yield method, budget, rows


def _group_rows(loaded: LoadedModel, group: list[Sample], length: int, todo, context: RowContext):
    """A context with several questions: prefilled once, compressed once per cell, every question answered from
    the restored compressed cache; one row per question (and metric), each with the context's id."""
    if group[0].metadata.get("skipped"):
        yield from _skipped_rows(group, length, todo, context)
        return
    seed = sample_seed(context.spec, group[0], length)
    parts = [sample_prompt(loaded.tokenizer, s, context.spec.query_aware) for s in group]
    if any(p.context_ids != parts[0].context_ids for p in parts):
        raise KVBenchError(f"{group[0].task}: questions grouped under one context render different contexts")
    questions = [(p.question_ids, s.max_new_tokens) for p, s in zip(parts, group)]
    grouped = iter_shared_context_cells(
        loaded, parts[0].context_ids, questions, todo, seed, batch_size=context.spec.batch_size
    )
    for method, budget, outcomes in grouped:
        each = outcomes if isinstance(outcomes, list) else [outcomes] * len(group)
        rows = [
            _row(s, length, method, budget, outcome, p, context, m)
            for s, p, outcome in zip(group, parts, each)
            for m in row_metrics(s)
        ]
        yield method, budget, rows


def _cell_rows(loaded: LoadedModel, sample: Sample | list[Sample], length: int, todo, context: RowContext):
    """(method, budget, rows) for each cell of one sample (or of one context's questions, a list) as it finishes:
    generated answers are scored with every metric the task reports (one row each); perplexity samples are scored,
    not generated."""
    if isinstance(sample, list):
        yield from _group_rows(loaded, sample, length, todo, context)
        return
    if sample.metadata.get("skipped"):
        yield from _skipped_rows([sample], length, todo, context)
        return
    seed = sample_seed(context.spec, sample, length)
    if sample.metric == "perplexity":
        context_ids, continuation_ids = token_split(loaded.tokenizer, sample)
        cells = iter_scoring_cells(loaded, context_ids, [], [continuation_ids], todo, seed)
        for method, budget, outcome in cells:
            yield (
                method,
                budget,
                [_perplexity_row(sample, length, method, budget, outcome, context_ids, continuation_ids, context)],
            )
        return
    parts = sample_prompt(loaded.tokenizer, sample, context.spec.query_aware)
    outcomes = iter_context_cells(
        loaded,
        parts.context_ids,
        parts.question_ids,
        todo,
        sample.max_new_tokens,
        seed=seed,
        batch_size=context.spec.batch_size,
    )
    for method, budget, outcome in outcomes:
        yield (
            method,
            budget,
            [_row(sample, length, method, budget, outcome, parts, context, m) for m in row_metrics(sample)],
        )


def unit_cells(loaded: LoadedModel, length: int, sample: Sample, todo, context: RowContext):
    """One work unit, whole: the sample's prefill and all its cells, as (method label, budget, rows) per cell.
    What a Ray actor runs and hands back to the driver, the store's only writer."""
    return [(method.label, budget, rows) for method, budget, rows in _cell_rows(loaded, sample, length, todo, context)]


def failed_unit_rows(loaded: LoadedModel, length: int, sample: Sample, todo, context: RowContext, reason: str):
    """The rows of a unit no worker could finish: every cell's rows with no score and the reason as their error,
    like a refused budget, marked `worker_failed` so that a rerun computes them again."""
    failure = KVBenchError(reason)
    if isinstance(sample, list):
        made = [
            _row(
                s,
                length,
                method,
                budget,
                failure,
                sample_prompt(loaded.tokenizer, s, context.spec.query_aware),
                context,
                m,
            )
            for method, budget in todo
            for s in sample
            for m in row_metrics(s)
        ]
    elif sample.metric == "perplexity":
        context_ids, continuation_ids = token_split(loaded.tokenizer, sample)
        made = [
            _perplexity_row(sample, length, method, budget, failure, context_ids, continuation_ids, context)
            for method, budget in todo
        ]
    else:
        parts = sample_prompt(loaded.tokenizer, sample, context.spec.query_aware)
        made = [
            _row(sample, length, method, budget, failure, parts, context, metric)
            for method, budget in todo
            for metric in row_metrics(sample)
        ]
    return [{**row, "worker_failed": True} for row in made]


def run_sweep(spec: SweepSpec, progress: bool = True) -> ResultStore:
    methods = validate(spec)
    maximum = model_max_length(spec.model)  # from the config alone: a length error needs no weights
    if maximum is not None and spec.lengths and max(spec.lengths) > maximum:
        raise KVBenchError(f"length {max(spec.lengths)} exceeds {spec.model}'s maximum of {maximum} tokens")
    store = ResultStore(spec.out)
    with store.writing():  # from before the model loads to the last row: a second run into --out is refused
        _sweep_into(store, spec, methods, progress)
    return store


def _sweep_into(store: ResultStore, spec: SweepSpec, methods: list[Method], progress: bool) -> None:
    # What must match for new rows to belong with those already in --out; checked before the model loads.
    identity = run_identity(spec)
    previous = store.open(identity, force=spec.force)
    loaded = load_model(spec.model, spec.device, spec.dtype)
    too_long = [n for n in spec.lengths if loaded.max_length is not None and n > loaded.max_length]
    if too_long:
        raise KVBenchError(f"length {too_long[0]} exceeds {spec.model}'s maximum of {loaded.max_length} tokens")
    calibrated, identities = calibrate_checked(loaded, methods, store, identity, spec.force)
    meta = run_metadata(spec, loaded, identity)
    if previous is not None and not previous.get("replaced"):
        meta["started_at"] = previous.get("started_at", meta["started_at"])
    invocation = invocation_record(spec)
    store.add_invocation(meta, previous, invocation)
    meta["calibration"] = {label: str(path) for label, path in calibrated.items()}
    store.write_meta(meta)
    context = RowContext(spec, identities, {**provenance(), "model_source": loaded.source})
    if any(row.get("worker_failed") for row in store.rows()):
        store.drop_rows(lambda row: row.get("worker_failed", False))  # units no worker finished: run them again
    # A cell is done when every metric its task reports has a row of its whole identity (a kill can fall between
    # a cell's rows).
    done = {cell_key(row) for row in store.rows()}
    cells = cells_for(methods, spec.budgets)
    cache_dir = spec.sample_cache or default_sample_cache()

    def key(task: str, length: int, sample_id: int, method: Method, budget: float, metric: str):
        return (task, length, sample_id, round(budget, 6), metric, identities[method.label][1], budget_tokens(budget))

    plan = []
    all_cells = 0
    for task in spec.tasks:
        for length in spec.lengths or [loaded.max_length]:
            if is_dataset_task(task):
                samples = dataset_samples(
                    task, loaded.tokenizer, length, spec.samples, spec.data, spec.over_length, spec.query_aware
                )
            else:
                samples = generate_samples(
                    task, loaded.tokenizer, length, spec.samples, spec.seed, spec.query_aware, cache_dir=cache_dir
                )
            all_cells += len(samples) * len(cells)
            units: dict[Any, list[tuple[Sample, list]]] = {}
            for sample in samples:
                metrics = row_metrics(sample)
                todo = [
                    (m, b)
                    for m, b in cells
                    if any(key(task, length, sample.sample_id, m, b, x) not in done for x in metrics)
                ]
                if not todo:
                    continue
                # Questions on one context (a data set's records with the same context text, as kvpress rows or
                # LOOGLE): one unit, compressed once per cell. Query-aware puts each question into its context.
                if "context_id" in sample.metadata and not spec.query_aware:
                    # keyed by the context as fitted: a cap can cut one context differently for longer questions
                    unit = (sample.metadata["context_id"], sample.context, "skipped" in sample.metadata)
                    units.setdefault(unit, []).append((sample, todo))
                else:
                    plan.append((length, sample, todo))
            for group in units.values():
                if len(group) == 1:
                    plan.append((length, *group[0]))
                else:  # every cell any of its questions still needs (rows already stored are not written twice)
                    needed = {(m.label, b) for _, todo in group for m, b in todo}
                    plan.append((length, [s for s, _ in group], [(m, b) for m, b in cells if (m.label, b) in needed]))
    total = sum(len(todo) * (len(s) if isinstance(s, list) else 1) for _, s, todo in plan)
    skipped = all_cells - total
    bar = tqdm(total=total, disable=not progress, unit="cell", desc="kvbench run", file=sys.stderr, dynamic_ncols=True)
    if skipped:
        bar.write(f"kvbench: {skipped} finished cells found in {spec.out}; running the {total} left")

    def record(rows: list[dict[str, Any]], where: str, cells: int = 1) -> None:
        for row in rows:
            if cell_key(row) not in done:
                store.append(row)
                done.add(cell_key(row))
        bar.set_postfix_str(where, refresh=False)
        bar.update(cells)

    with bar:
        if spec.ray_address or spec.workers != 1:
            from kvbench.harness.runner.ray_runner import run_units

            run_units(spec, loaded, plan, methods, context, record)
        else:
            for length, sample, todo in plan:
                first = sample[0] if isinstance(sample, list) else sample
                count = len(sample) if isinstance(sample, list) else 1
                for method, budget, rows in _cell_rows(loaded, sample, length, todo, context):
                    record(rows, f"{first.task}@{length} {method.label}@{budget_label(budget)}", count)
    meta["finished_at"] = invocation["finished_at"] = now()
    store.write_meta(meta)

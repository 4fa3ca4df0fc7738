"""`kvbench lm-eval`: lm-eval tasks × methods × budgets through `KVBenchLM`, rows in kvbench's result store.

Each (method, budget) is one `lm_eval.simple_evaluate` call with `log_samples=True`; every logged sample
becomes one row per metric, with lm-eval's own per-sample metric value as the score and the kv bytes, split
sizes and timings `KVBenchLM` recorded for that doc, so `kvbench report` renders lm-eval runs like sweeps.
A finished cell is listed in run.json; rerunning the same command skips it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvbench.harness.errors import KVBenchError
from kvbench.harness.files import now
from kvbench.harness.models.loading import LoadedModel, load_model
from kvbench.harness.provenance import provenance
from kvbench.harness.requirements import installed_version
from kvbench.harness.runner.store import ResultStore, cell_key
from kvbench.harness.runner.sweep import (
    RowContext,
    SweepSpec,
    calibrate_checked,
    cells_for,
    invocation_record,
    run_identity,
    run_metadata,
    token_fields,
    validate,
)
from kvbench.harness.token_budget import budget_tokens

RUNNER = "lm-eval"


@dataclass
class LmEvalSpec:
    model: str
    methods: list[str]
    budgets: list[float]
    tasks: list[str]
    out: Path
    include_paths: list[Path] = field(default_factory=list)
    limit: int | None = None
    seed: int = 42
    question_tokens: int = 64
    apply_chat_template: bool = False
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False
    command: str = ""


def task_manager(include_paths: list[Path], tasks: list[str]):
    """lm-eval's task index: only the include paths when they hold every task (fast, offline), else with
    lm-eval's built-in tasks too. Unknown names are a one-line error."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise KVBenchError("kvbench lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    for path in include_paths:
        if not path.is_dir():
            raise KVBenchError(f"--include-path {path} is not a directory")
    paths = [str(path.resolve()) for path in include_paths] or None
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(name not in manager.all_tasks for name in tasks):
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise KVBenchError(
            f"unknown lm-eval task {unknown[0]!r}; pass the directory of its YAML with --include-path "
            "(kvbench export-lm-eval writes kvbench's tasks there)"
        )
    return manager


def _rows(
    samples: dict[str, list[dict]], lm, method, budget: float, spec: LmEvalSpec, fields: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per (logged sample, metric); lm-eval names a metric under a filter other than `none` metric,filter."""
    rows = []
    for task, logged in samples.items():
        for sample in logged:
            doc = sample["doc"]
            record = lm.records.get((task, sample["doc_id"]))
            output = sample["filtered_resps"][0]
            references = doc.get("references") if isinstance(doc.get("references"), list) else [str(sample["target"])]
            base = {
                "task": task,
                "length": int(doc.get("length") or 0),
                "sample_id": int(sample["doc_id"]),
                **fields,
                "budget": budget,
                **token_fields(budget),
                "references": references,
                "context_tokens": record.context_tokens if record else None,
                "question_tokens": record.question_tokens if record else None,
                "depth": doc.get("depth"),
                "query_aware": False,
                "seed": spec.seed,
            }
            for metric in sample["metrics"]:
                name = metric if sample["filter"] == "none" else f"{metric},{sample['filter']}"
                row = {**base, "metric": name}
                if record is not None and record.error:
                    rows.append({**row, "score": None, "error": record.error})
                    continue
                row["score"] = float(sample[metric])
                row["output"] = output if isinstance(output, str) else None
                if record is not None:
                    row.update(
                        kv_bytes=record.kv_bytes,
                        kv_bytes_full=record.kv_bytes_full,
                        kv_ratio=round(record.kv_bytes / record.kv_bytes_full, 6) if record.kv_bytes_full else None,
                        kv_bytes_peak=record.kv_bytes_peak,
                        prefill_s=round(record.prefill_s, 4),
                        compress_s=round(record.compress_s, 4),
                        decode_s=round(record.decode_s, 4),
                        new_tokens=record.new_tokens,
                        stopped_by=record.stopped_by,
                        prefill_peak_memory_bytes=record.prefill_peak_memory_bytes,
                        decode_peak_memory_bytes=record.decode_peak_memory_bytes,
                    )
                rows.append(row)
    return rows


def _evaluate(
    loaded: LoadedModel, method, budget: float, manager, spec: LmEvalSpec, docs: dict[str, list[int]], fields
) -> list[dict[str, Any]]:
    import lm_eval

    from kvbench.harness.lm_eval.adapter import KVBenchLM

    lm = KVBenchLM(
        pretrained=loaded,
        method=method,
        budget=budget,
        question_tokens=spec.question_tokens,
        on_refusal="record",
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(docs),
        task_manager=manager,
        samples=docs,
        log_samples=True,
        apply_chat_template=spec.apply_chat_template,
        bootstrap_iters=0,
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
    )
    return _rows(results["samples"], lm, method, lm.budget, spec, fields)


def doc_counts(manager, tasks: list[str]) -> dict[str, int]:
    """How many evaluation docs each task has (lm-eval's doc ids are 0..n-1)."""
    if hasattr(manager, "load"):  # lm-eval 0.4.10+: flat dicts of tasks and groups
        loaded = manager.load(list(tasks))["tasks"]
    else:
        loaded = manager.load_task_or_group(list(tasks))
    counts = {}
    for name in tasks:
        task = loaded.get(name)
        if task is None or not hasattr(task, "eval_docs"):
            raise KVBenchError(f"lm-eval task {name!r} is a group; name its tasks with --tasks")
        counts[name] = len(task.eval_docs)
    return counts


def lm_eval_identity(spec: LmEvalSpec) -> dict[str, Any]:
    """The run identity of `kvbench run` plus what changes lm-eval's prompts and splits: the runner, the
    uncompressed question window, lm-eval's chat template switch and the task directories (by path and by the
    hash of their files)."""
    sweep = _as_sweep(spec)
    identity = run_identity(sweep)
    identity.pop("task_generator_version")
    identity.pop("query_aware")
    return {
        **identity,
        "runner": RUNNER,
        "question_tokens": spec.question_tokens,
        "apply_chat_template": spec.apply_chat_template,
        "include_paths": [
            {"path": str(path.resolve()), "sha256": _directory_sha256(path)} for path in spec.include_paths
        ],
        "lm_eval_version": installed_version("lm_eval"),
    }


def _directory_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(directory)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _as_sweep(spec: LmEvalSpec) -> SweepSpec:
    return SweepSpec(
        model=spec.model,
        methods=spec.methods,
        budgets=spec.budgets,
        tasks=[],
        lengths=[],
        samples=1,
        out=spec.out,
        seed=spec.seed,
        device=spec.device,
        dtype=spec.dtype,
        force=spec.force,
        command=spec.command,
    )


def run_lm_eval(spec: LmEvalSpec, progress: bool = True) -> ResultStore:
    """Run every (method, budget) over the lm-eval tasks, appending rows to `spec.out` as each cell finishes.

    A cell is done per document: a rerun evaluates only the docs (within --limit) that have no row of the cell's
    whole identity yet, so raising --limit computes just the new ones."""
    sweep = _as_sweep(spec)
    methods = validate(sweep)
    if spec.limit is not None and spec.limit < 1:
        raise KVBenchError(f"--limit {spec.limit} must be at least 1")
    if spec.question_tokens < 0:
        raise KVBenchError(f"--question-tokens {spec.question_tokens} must be 0 or more")
    manager = task_manager(spec.include_paths, spec.tasks)
    store = ResultStore(spec.out)
    with store.writing():  # from before the model loads to the last row: a second run into --out is refused
        _evaluate_into(store, spec, sweep, methods, manager, progress)
    return store


def _evaluate_into(
    store: ResultStore, spec: LmEvalSpec, sweep: SweepSpec, methods: list, manager, progress: bool
) -> None:
    identity = lm_eval_identity(spec)
    previous = store.open(identity, force=spec.force)
    loaded = load_model(spec.model, spec.device, spec.dtype)
    _, identities = calibrate_checked(loaded, methods, store, identity, spec.force)
    meta = run_metadata(sweep, loaded, identity)
    meta.update(
        runner=RUNNER,
        tasks=spec.tasks,
        lengths=[],
        samples=spec.limit,
        include_paths=[str(path) for path in spec.include_paths],
        question_tokens=spec.question_tokens,
        apply_chat_template=spec.apply_chat_template,
        versions={**meta["versions"], "lm_eval": installed_version("lm_eval")},
    )
    if previous is not None and not previous.get("replaced"):
        meta["started_at"] = previous.get("started_at", meta["started_at"])
    invocation = invocation_record(sweep)
    store.add_invocation(meta, previous, invocation)
    store.write_meta(meta)
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    context = RowContext(sweep, identities, {**provenance(), "model_source": loaded.source})
    counts = doc_counts(manager, spec.tasks)
    wanted = {task: range(min(n, spec.limit) if spec.limit is not None else n) for task, n in counts.items()}
    present = {cell_key(row) for row in store.rows()}
    done_docs = {
        (row["task"], int(row["sample_id"]), round(float(row["budget"]), 6), row.get("identity_hash"),
         row.get("budget_tokens"))
        for row in store.rows()
    }  # fmt: skip
    plan = []
    for method, budget in cells_for(methods, spec.budgets):
        digest = identities[method.label][1]
        docs = {
            task: [i for i in ids if (task, i, round(budget, 6), digest, budget_tokens(budget)) not in done_docs]
            for task, ids in wanted.items()
        }
        docs = {task: ids for task, ids in docs.items() if ids}
        if docs:
            plan.append((method, budget, docs))
    for method, budget, docs in tqdm(plan, disable=not progress, unit="cell", desc="kvbench lm-eval"):
        for row in _evaluate(loaded, method, budget, manager, spec, docs, context.method_fields(method)):
            if cell_key(row) not in present:
                store.append(row)
                present.add(cell_key(row))
    meta["finished_at"] = invocation["finished_at"] = now()
    store.write_meta(meta)

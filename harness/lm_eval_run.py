"""`kvbench lm-eval`: lm-eval tasks × methods × budgets through `KVBenchLM`, rows in kvbench's result store.

Each (method, budget) is one `lm_eval.simple_evaluate` call with `log_samples=True`; every logged sample
becomes one row per metric, with lm-eval's own per-sample metric value as the score and the kv bytes, split
sizes and timings `KVBenchLM` recorded for that doc, so `kvbench report` renders lm-eval runs like sweeps.
A finished cell is listed in run.json; rerunning the same command skips it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvbench.harness.errors import KVBenchError
from kvbench.harness.models import LoadedModel, load_model
from kvbench.harness.store import ResultStore, cell_key, now
from kvbench.harness.sweep import SweepSpec, cells_for, run_metadata, validate

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


def _rows(samples: dict[str, list[dict]], lm, method: str, budget: float, spec: LmEvalSpec) -> list[dict[str, Any]]:
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
                "method": method,
                "budget": budget,
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
                        prefill_s=round(record.prefill_s, 4),
                        compress_s=round(record.compress_s, 4),
                        decode_s=round(record.decode_s, 4),
                        new_tokens=record.new_tokens,
                        stopped_by=record.stopped_by,
                        peak_memory_bytes=record.peak_memory_bytes,
                    )
                rows.append(row)
    return rows


def _evaluate(loaded: LoadedModel, method, budget: float, manager, spec: LmEvalSpec) -> list[dict[str, Any]]:
    import lm_eval

    from kvbench.harness.lm_eval_adapter import KVBenchLM

    lm = KVBenchLM(
        pretrained=loaded,
        method=method.name,
        budget=budget,
        question_tokens=spec.question_tokens,
        on_refusal="record",
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(spec.tasks),
        task_manager=manager,
        limit=spec.limit,
        log_samples=True,
        apply_chat_template=spec.apply_chat_template,
        bootstrap_iters=0,
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
    )
    return _rows(results["samples"], lm, method.name, lm.budget, spec)


def run_lm_eval(spec: LmEvalSpec, progress: bool = True) -> ResultStore:
    """Run every (method, budget) over the lm-eval tasks, appending rows to `spec.out` as each cell finishes."""
    sweep = SweepSpec(
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
    methods = validate(sweep)
    if spec.limit is not None and spec.limit < 1:
        raise KVBenchError(f"--limit {spec.limit} must be at least 1")
    if spec.question_tokens < 0:
        raise KVBenchError(f"--question-tokens {spec.question_tokens} must be 0 or more")
    manager = task_manager(spec.include_paths, spec.tasks)
    store = ResultStore(spec.out)
    previous = store.open({"model": spec.model, "seed": spec.seed, "runner": RUNNER}, force=spec.force)
    loaded = load_model(spec.model, spec.device, spec.dtype)
    meta = run_metadata(sweep, loaded)
    meta.update(
        runner=RUNNER,
        tasks=spec.tasks,
        lengths=[],
        samples=spec.limit,
        include_paths=[str(path) for path in spec.include_paths],
        question_tokens=spec.question_tokens,
        apply_chat_template=spec.apply_chat_template,
        versions={**meta["versions"], "lm_eval": _lm_eval_version()},
        finished_cells=[],
    )
    if previous is not None:
        meta["started_at"] = previous.get("started_at", meta["started_at"])
        meta["finished_cells"] = previous.get("finished_cells", [])
    store.write_meta(meta)
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    present = {(cell_key(row), row["metric"]) for row in store.rows()}
    todo = [(m, b) for m, b in cells_for(methods, spec.budgets) if [m.name, round(b, 6)] not in meta["finished_cells"]]
    for method, budget in tqdm(todo, disable=not progress, unit="cell", desc="kvbench lm-eval"):
        for row in _evaluate(loaded, method, budget, manager, spec):
            if (cell_key(row), row["metric"]) not in present:
                store.append(row)
                present.add((cell_key(row), row["metric"]))
        meta["finished_cells"].append([method.name, round(budget, 6)])
        store.write_meta(meta)
    meta["finished_at"] = now()
    store.write_meta(meta)
    return store


def _lm_eval_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None

"""Aggregate tables over a run's rows, as numbers; formatting is the writers' business.

Rules every table follows (tasks.md §11): refused cells are counted, never scored as zero;
scores are grouped by metric and never averaged across metrics.
"""

from __future__ import annotations

import pandas as pd

MEAN_OVER_TASKS = "mean over tasks"
# Restated from kvbench.tasks (reports read only the store): metrics where lower is better, and the
# generation-quality metrics that get their own report section.
LOWER_IS_BETTER = frozenset({"perplexity"})
QUALITY_METRICS = ("rouge1", "rouge2", "rougeL", "bertscore_f1", "perplexity")
REFERENCE_METHOD = "full"
MIB = 2**20
CELL = ["method", "budget"]


def method_order(methods: pd.Series | list[str]) -> list[str]:
    """`full` first as the reference, then alphabetical, so every table and plot lists methods alike."""
    names = sorted(set(methods))
    return sorted(names, key=lambda name: (name != REFERENCE_METHOD, name))


def sort_cells(frame: pd.DataFrame, leading: list[str] | None = None) -> pd.DataFrame:
    """Sort by `leading` columns, then method (reference first) and budget."""
    order = {name: rank for rank, name in enumerate(method_order(frame["method"]))}
    ranked = frame.assign(_method_rank=frame["method"].map(order))
    ranked = ranked.sort_values([*(leading or []), "_method_rank", "budget"], kind="stable")
    return ranked.drop(columns="_method_rank").reset_index(drop=True)


def metric_label(metric: str) -> str:
    """The metric's name, flagged when a lower value is better so no reader takes it for an accuracy."""
    return f"{metric} (lower is better)" if metric in LOWER_IS_BETTER else metric


def quality_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean of each generation-quality metric per (method, budget), one column per metric, refused rows left out."""
    quality = rows[rows["metric"].isin(QUALITY_METRICS) & ~rows["refused"]]
    if quality.empty:
        return pd.DataFrame()
    wide = quality.groupby([*CELL, "metric"])["score"].mean().unstack("metric")
    wide = wide.reindex(columns=[metric for metric in QUALITY_METRICS if metric in wide.columns])
    return sort_cells(wide.rename(columns=metric_label).reset_index())


def task_scores(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: mean score per (method, budget) and task, plus the mean over that metric's tasks.

    The mean over tasks weighs tasks equally (RULER's convention) and is missing when any task
    has no scored row, since a mean over fewer tasks would not compare with the other methods'.
    """
    tables: dict[str, pd.DataFrame] = {}
    for metric, group in rows.groupby("metric", sort=True):
        wide = group.groupby([*CELL, "task"])["score"].mean().unstack("task")
        wide = wide.reindex(columns=sorted(wide.columns))
        wide[MEAN_OVER_TASKS] = wide.mean(axis=1, skipna=False)
        tables[str(metric)] = sort_cells(wide.reset_index())
    return tables


def task_nulls(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: count of empty answers per (method, budget) and task (tasks.md §11.4)."""
    tables: dict[str, pd.DataFrame] = {}
    for metric, group in rows.groupby("metric", sort=True):
        wide = group.groupby([*CELL, "task"])["null"].sum().unstack("task", fill_value=0).astype(int)
        tables[str(metric)] = sort_cells(wide.reindex(columns=sorted(wide.columns)).reset_index())
    return tables


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (metric, method, budget): headline score, achieved KV ratio and row accounting."""
    counts = (
        rows.assign(kv_ratio=rows["kv_ratio"].where(~rows["refused"]))
        .groupby(["metric", *CELL])
        .agg(
            kv_ratio=("kv_ratio", "mean"),
            rows=("task", "size"),
            nulls=("null", "sum"),
            refused=("refused", "sum"),
        )
        .reset_index()
    )
    means = pd.concat(
        [table[[*CELL, MEAN_OVER_TASKS]].assign(metric=metric) for metric, table in task_scores(rows).items()]
    )
    table = counts.merge(means, on=["metric", *CELL], how="left")
    table = table[["metric", *CELL, MEAN_OVER_TASKS, "kv_ratio", "rows", "nulls", "refused"]]
    return sort_cells(table, leading=["metric"])


def pareto_points(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (metric, method, budget): mean stored KV MiB against the summary's headline score."""
    kv = rows[~rows["refused"]].groupby(["metric", *CELL])["kv_bytes"].mean().div(MIB).rename("kv_mib").reset_index()
    points = summary(rows)[["metric", *CELL, MEAN_OVER_TASKS]].merge(kv, on=["metric", *CELL], how="left")
    return points.dropna(subset=["kv_mib", MEAN_OVER_TASKS])


def latency(rows: pd.DataFrame) -> pd.DataFrame:
    """Medians of timings and KV sizes per (length, method, budget).

    Split by length because prefill and decode cost grow with context: a median across lengths
    would compare nothing. Peak memory is the maximum, being a peak; it is missing on CPU. Cells
    whose rows carry no measurements at all (e.g. lm-eval scores) are left out.
    """
    scored = rows[~rows["refused"]].copy()
    tokens = scored["new_tokens"].where(scored["new_tokens"] > 0)
    scored["decode_ms_per_token"] = 1000 * scored["decode_s"] / tokens
    scored["kv_mib"] = scored["kv_bytes"] / MIB
    scored["kv_full_mib"] = scored["kv_bytes_full"] / MIB
    scored["peak_mib"] = scored["peak_memory_bytes"] / MIB
    table = (
        scored.groupby(["length", *CELL])
        .agg(
            prefill_s=("prefill_s", "median"),
            compress_s=("compress_s", "median"),
            decode_s=("decode_s", "median"),
            decode_ms_per_token=("decode_ms_per_token", "median"),
            kv_mib=("kv_mib", "mean"),
            kv_full_mib=("kv_full_mib", "mean"),
            peak_mib=("peak_mib", "max"),
        )
        .reset_index()
        .dropna(how="all", subset=["prefill_s", "compress_s", "decode_s", "kv_mib", "kv_full_mib", "peak_mib"])
    )
    return sort_cells(table, leading=["length"])


def is_needle_task(task: str) -> bool:
    """Tasks with a needle depth: the NIAH family and passkey retrieval."""
    return task.startswith("niah") or task == "passkey"


def needle_depths(rows: pd.DataFrame) -> pd.DataFrame:
    """Needle rows with their depth decile (0 = 0–10 %, …, 9 = 90–100 %), refused cells left out."""
    needles = rows[rows["task"].map(is_needle_task) & rows["depth"].notna() & ~rows["refused"]].copy()
    needles["decile"] = (needles["depth"] // 10).clip(0, 9).astype(int)
    return needles


def sample_outputs(rows: pd.DataFrame) -> pd.DataFrame:
    """Every row's answer next to its references, ordered so one sample's methods sit together."""
    columns = [
        "task", "length", "sample_id", "method", "budget", "metric", "score", "refused", "error", "output", "references",
    ]  # fmt: skip
    return sort_cells(rows[columns], leading=["task", "length", "sample_id"])

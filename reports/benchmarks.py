"""The standard data sets' results in their own terms, from the store's rows alone.

- LongBench (and LongBench-E): the score per subset and their average (each subset weighs the same, as
  LongBench's tables average its per-subset scores, whatever their metrics); LongBench-E also per length bin of the
  record's `length` (0-4k, 4-8k, 8k+, the data set's own unit). When Chinese subsets are present, LongBench's table
  also has the English and the Chinese average (`average_en`, `average_zh`, each over its own subsets) beside the
  overall one, as LongBench's paper reports En / Zh / All.
- RULER: per task and their average, per context length.
- LongBench-v2: Overall, Easy, Hard, Short, Medium, Long (accuracy x100).
- InfiniteBench: per task and their average.

Every mean carries its 95% bootstrap interval; the Δ vs full column pairs each method with full sample by sample
(`tables.cell_intervals`). Skipped samples (over the length cap with `--over-length skip`) are counted, not scored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvbench.reports import tables
from kvbench.reports.tables import CELL, DIFF_TO_REFERENCE, MEAN_OVER_TASKS, N_SCORED, interval_columns

AVERAGE = "average"
# Restated from kvbench.tasks.metrics.longbench (reports read only the store).
LONGBENCH_E_BINS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, np.inf))
# Restated from kvbench.tasks.datasets.catalog.LONGBENCH_ZH_SUBSETS.
LONGBENCH_ZH_TASKS = frozenset(
    f"longbench:{subset}" for subset in ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
)


def _dataset_rows(rows: pd.DataFrame, *names: str) -> pd.DataFrame:
    if "dataset" not in rows.columns:
        return rows.iloc[0:0]
    return rows[rows["dataset"].isin(names)]


def _columns(estimate: pd.DataFrame, name: str, with_diff: bool = False) -> pd.DataFrame:
    keep = estimate[[*CELL, *interval_columns(MEAN_OVER_TASKS)]].rename(
        columns=dict(zip(interval_columns(MEAN_OVER_TASKS), interval_columns(name)))
    )
    if with_diff:
        keep = keep.join(estimate[[*interval_columns(DIFF_TO_REFERENCE), N_SCORED]])
    return keep


def breakdown(rows: pd.DataFrame, parts: list[tuple[str, pd.Series]], headline: str | None = None) -> pd.DataFrame:
    """Per (length, method, budget): the mean of each named part of the rows with its interval; `headline` (one
    of the parts) also gets its paired difference to full and its n. Skipped rows are counted in `skipped`."""
    frames = []
    rows = tables.with_budget_labels(rows)
    for length, at_length in rows.groupby("length", sort=True):
        merged = None
        for name, mask in parts:
            part = at_length[mask.loc[at_length.index]]
            part = part[~_skipped(part)]
            if part.empty:
                continue
            columns = _columns(tables.cell_intervals(part), name, with_diff=name == headline)
            merged = columns if merged is None else merged.merge(columns, on=CELL, how="outer")
        if merged is None:
            continue
        skipped = at_length[_skipped(at_length)].groupby(CELL).size().rename("skipped").reset_index()
        merged = merged.merge(skipped, on=CELL, how="left").fillna({"skipped": 0})
        frames.append(merged.assign(length=length))
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    first = ["length", *CELL]
    return tables.sort_cells(frame[first + [c for c in frame.columns if c not in first]], ["length"])


def _skipped(rows: pd.DataFrame) -> pd.Series:
    if "skipped" not in rows.columns:
        return pd.Series(False, index=rows.index)
    return rows["skipped"].fillna(False).astype(bool)


def _per_task(rows: pd.DataFrame, prefix: str) -> list[tuple[str, pd.Series]]:
    tasks = sorted(rows["task"].unique())
    return [(AVERAGE, pd.Series(True, index=rows.index))] + [
        (task.removeprefix(prefix), rows["task"] == task) for task in tasks
    ]


def longbench(rows: pd.DataFrame) -> pd.DataFrame:
    picked = _dataset_rows(rows, "longbench")
    if picked.empty:
        return pd.DataFrame()
    parts = _per_task(picked, "longbench:")
    chinese = picked["task"].isin(LONGBENCH_ZH_TASKS)
    if chinese.any():
        parts[1:1] = [(f"{AVERAGE}_en", ~chinese), (f"{AVERAGE}_zh", chinese)]
    return breakdown(picked, parts, AVERAGE)


def longbench_e(rows: pd.DataFrame) -> pd.DataFrame:
    picked = _dataset_rows(rows, "longbench_e")
    if picked.empty:
        return pd.DataFrame()
    parts = _per_task(picked, "longbench_e:")
    if "source_length" in picked.columns:
        lengths = pd.to_numeric(picked["source_length"], errors="coerce")
        parts += [(name, (lengths >= low) & (lengths < high)) for name, low, high in LONGBENCH_E_BINS]
    return breakdown(picked, parts, AVERAGE)


def ruler(rows: pd.DataFrame) -> pd.DataFrame:
    picked = _dataset_rows(rows, "ruler")
    return breakdown(picked, _per_task(picked, "ruler:"), AVERAGE) if len(picked) else pd.DataFrame()


def infinitebench(rows: pd.DataFrame) -> pd.DataFrame:
    picked = _dataset_rows(rows, "infinitebench")
    return breakdown(picked, _per_task(picked, "infinitebench:"), AVERAGE) if len(picked) else pd.DataFrame()


def longbench_v2(rows: pd.DataFrame) -> pd.DataFrame:
    picked = rows[rows["task"] == "longbench_v2"] if "task" in rows.columns else rows.iloc[0:0]
    if picked.empty:
        return pd.DataFrame()
    parts = [("Overall", pd.Series(True, index=picked.index))]
    for column, values in (("difficulty", ("easy", "hard")), ("length_class", ("short", "medium", "long"))):
        if column in picked.columns:
            parts += [(value.capitalize(), picked[column] == value) for value in values]
    return breakdown(picked, parts, "Overall")


def benchmark_tables(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(caption, table) for every data set the rows hold."""
    made = [
        ("LongBench: per subset and average", longbench(rows)),
        ("LongBench-E: per subset, average and length bin", longbench_e(rows)),
        ("RULER: per task and average", ruler(rows)),
        ("LongBench-v2: Overall / Easy / Hard / Short / Medium / Long", longbench_v2(rows)),
        ("InfiniteBench: per task and average", infinitebench(rows)),
    ]
    return [(caption, frame) for caption, frame in made if not frame.empty]

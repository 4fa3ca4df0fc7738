"""Aggregate tables over a run's rows, as numbers; formatting is the writers' business.

Rules every table follows (tasks.md §11, DESIGN §5): refused cells are counted, never scored as zero;
scores are grouped by metric and never averaged across metrics; lengths are never pooled into one mean;
every mean carries its n and a 95% bootstrap interval, and comparisons with full are paired by sample.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvbench.reports import intervals
from kvbench.reports.store import budget_labels

MEAN_OVER_TASKS = "mean over tasks"
DIFF_TO_REFERENCE = "Δ vs full"
N_SCORED = "n"
N_PAIRED = "n paired"
# A mean's interval bounds sit in the columns named after it with these suffixes; writers show the three together.
LO = ":lo"
HI = ":hi"
# Restated from kvbench.tasks (reports read only the store): metrics where lower is better, and the
# generation-quality metrics that get their own report section.
LOWER_IS_BETTER = frozenset({"perplexity"})
QUALITY_METRICS = ("rouge1", "rouge2", "rougeL", "bertscore_f1", "perplexity")
REFERENCE_METHOD = "full"
MIB = 2**20
# A cell is one configuration at one budget: two configurations of one method are two cells, and a token budget
# (`budget_label` 128t, `budget` 128) never shares a cell with a fraction (`budget` 1 is both `1` and `1t`).
CELL = ["method_label", "budget", "budget_label"]
# Within one (metric, length) a sample is (task, sample_id); lengths are never pooled.
SAMPLE = ["task", "sample_id"]


def is_reference(label: str) -> bool:
    """Whether a method label names the uncompressed `full` cache (labels read `method[:option=value...]`)."""
    return label.split(":", 1)[0] == REFERENCE_METHOD


def method_order(labels: pd.Series | list[str]) -> list[str]:
    """`full` first as the reference, then alphabetical, so every table and plot lists methods alike."""
    return sorted(set(labels), key=lambda label: (not is_reference(label), label))


def with_budget_labels(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with their `budget_label` (the store's loader adds it; rows built in memory may lack it)."""
    return rows if "budget_label" in rows.columns else rows.assign(budget_label=budget_labels(rows))


def is_token_budget(labels: pd.Series) -> pd.Series:
    """Which budget labels are token budgets (`128t`), as against fractions (`0.25`)."""
    return labels.astype(str).str.endswith("t")


def sort_cells(frame: pd.DataFrame, leading: list[str] | None = None) -> pd.DataFrame:
    """Sort by `leading` columns, then method label (reference first), fractions before token budgets, budget."""
    order = {name: rank for rank, name in enumerate(method_order(frame["method_label"]))}
    ranked = frame.assign(_method_rank=frame["method_label"].map(order))
    helpers = ["_method_rank"]
    if "budget_label" in frame.columns:
        ranked["_tokens"] = is_token_budget(frame["budget_label"])
        helpers.append("_tokens")
    ranked = ranked.sort_values([*(leading or []), *helpers, "budget"], kind="stable")
    return ranked.drop(columns=helpers).reset_index(drop=True)


def metric_label(metric: str) -> str:
    """The metric's name, flagged when a lower value is better so no reader takes it for an accuracy."""
    return f"{metric} (lower is better)" if metric in LOWER_IS_BETTER else metric


def interval_columns(name: str) -> list[str]:
    """A mean's column and its bounds' columns, in the order the tables keep them."""
    return [name, name + LO, name + HI]


def score_matrix(group: pd.DataFrame) -> pd.DataFrame:
    """One (metric, length)'s scores as samples × cells; NaN where a cell refused or never ran a sample."""
    return with_budget_labels(group).groupby([*SAMPLE, *CELL])["score"].mean().unstack(CELL)


def _reference_cell(group: pd.DataFrame, cells: list[tuple]) -> tuple | None:
    """The cell of the `full` rows (the first in method order if a store holds several)."""
    labels = method_order(group.loc[group["method"] == REFERENCE_METHOD, "method_label"])
    return next((cell for label in labels for cell in cells if cell[0] == label), None)


def cell_intervals(group: pd.DataFrame) -> pd.DataFrame:
    """Per cell of one (metric, length): mean over tasks with its interval and n, and its paired difference to full.

    The difference is taken sample by sample over the samples both cells scored (a refusal on either side
    drops the sample from the pair), averaged like the mean (per task, then over tasks), so a method is
    judged against full on the same questions. All columns share one set of bootstrap draws.
    """
    matrix = score_matrix(group)
    cells = list(matrix.columns)
    values = matrix.to_numpy(dtype=float)
    reference = _reference_cell(with_budget_labels(group), cells)
    diffs = values - values[:, [cells.index(reference)]] if reference is not None else np.empty((len(values), 0))
    estimate = intervals.bootstrap(np.hstack([values, diffs]), matrix.index.get_level_values("task").to_numpy())
    frame = pd.DataFrame(cells, columns=CELL)
    count = len(cells)
    for name, part in ((MEAN_OVER_TASKS, slice(0, count)), (DIFF_TO_REFERENCE, slice(count, None))):
        frame = frame.assign(**_estimate_columns(name, estimate, part, count))
    frame[N_SCORED] = estimate.n[:count].astype(float)
    frame[N_PAIRED] = estimate.n[count:].astype(float) if reference is not None else np.nan
    if reference is not None:
        is_ref = [cell == reference for cell in cells]
        frame.loc[is_ref, [*interval_columns(DIFF_TO_REFERENCE), N_PAIRED]] = np.nan
    return frame


def _estimate_columns(name: str, estimate: intervals.Estimate, part: slice, count: int) -> dict[str, np.ndarray]:
    """The mean and bounds of one slice of the bootstrapped columns; all missing when the slice is empty."""
    arrays = (estimate.mean[part], estimate.lo[part], estimate.hi[part])
    return {
        column: array if len(array) == count else np.full(count, np.nan)
        for column, array in zip(interval_columns(name), arrays)
    }


def task_intervals(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (metric, length, task, cell): mean score, its interval over that task's samples, and n."""
    parts = []
    for (metric, length, task), group in rows.groupby(["metric", "length", "task"], sort=True):
        estimate = cell_intervals(group)
        parts.append(
            estimate[[*CELL, *interval_columns(MEAN_OVER_TASKS), N_SCORED]].assign(
                metric=metric, length=length, task=task
            )
        )
    if not parts:
        return pd.DataFrame(columns=["metric", "length", "task", *CELL, *interval_columns("score"), N_SCORED])
    frame = pd.concat(parts, ignore_index=True)
    return frame.rename(columns=dict(zip(interval_columns(MEAN_OVER_TASKS), interval_columns("score"))))


def quality_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (length, cell), each generation-quality metric's mean over tasks and its interval, one metric per column."""
    quality = summary(rows[rows["metric"].isin(QUALITY_METRICS)])
    if quality.empty:
        return pd.DataFrame()
    wide = quality.set_index(["length", *CELL, "metric"])[interval_columns(MEAN_OVER_TASKS)].unstack("metric")
    metrics = [metric for metric in QUALITY_METRICS if metric in set(quality["metric"])]
    wide.columns = [metric_label(metric) + part[len(MEAN_OVER_TASKS) :] for part, metric in wide.columns]
    ordered = [column for metric in metrics for column in interval_columns(metric_label(metric))]
    return sort_cells(wide[ordered].reset_index(), leading=["length"])


def task_scores(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: mean score with its interval per (length, cell) and task, plus the mean over that metric's tasks.

    The mean over tasks weighs tasks equally (RULER's convention) and is missing when any task
    has no scored row, since a mean over fewer tasks would not compare with the other methods'.
    """
    per_task = task_intervals(rows)
    overall = summary(rows)
    tables: dict[str, pd.DataFrame] = {}
    for metric, group in per_task.groupby("metric", sort=True):
        tasks = sorted(group["task"].unique())
        wide = group.set_index(["length", *CELL, "task"])[interval_columns("score")].unstack("task")
        wide.columns = [task + part[len("score") :] for part, task in wide.columns]
        wide = wide[[column for task in tasks for column in interval_columns(task)]].reset_index()
        means = overall.loc[
            overall["metric"] == metric, ["length", *CELL, *interval_columns(MEAN_OVER_TASKS), N_SCORED]
        ]
        tables[str(metric)] = sort_cells(wide.merge(means, on=["length", *CELL], how="left"), leading=["length"])
    return tables


def task_nulls(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: count of empty answers per (length, cell) and task (tasks.md §11.4)."""
    tables: dict[str, pd.DataFrame] = {}
    for metric, group in with_budget_labels(rows).groupby("metric", sort=True):
        wide = group.groupby(["length", *CELL, "task"])["null"].sum().unstack("task", fill_value=0).astype(int)
        tables[str(metric)] = sort_cells(wide.reindex(columns=sorted(wide.columns)).reset_index(), leading=["length"])
    return tables


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (metric, length, cell): headline score with its interval and n, the paired difference
    to full with its interval and n, achieved KV ratio and row accounting."""
    if rows.empty:
        return pd.DataFrame()
    rows = with_budget_labels(rows)
    keys = ["metric", "length", *CELL]
    counts = (
        rows.assign(kv_ratio=rows["kv_ratio"].where(~rows["refused"]))
        .groupby(keys)
        .agg(
            kv_ratio=("kv_ratio", "mean"),
            rows=("task", "size"),
            nulls=("null", "sum"),
            refused=("refused", "sum"),
        )
        .reset_index()
    )
    means = pd.concat(
        [
            cell_intervals(group).assign(metric=metric, length=length)
            for (metric, length), group in rows.groupby(["metric", "length"], sort=True)
        ]
    )
    table = counts.merge(means, on=keys, how="left")
    headline = [*interval_columns(MEAN_OVER_TASKS), N_SCORED, *interval_columns(DIFF_TO_REFERENCE), N_PAIRED]
    table = table[[*keys, *headline, "kv_ratio", "rows", "nulls", "refused"]]
    if "sample_tokens" in rows.columns:
        # Data-set samples' own lengths: their `length` is a cap (or, with length bins, a bin).
        own = pd.to_numeric(rows["sample_tokens"], errors="coerce").rename("sample_tokens")
        if own.notna().any():
            table = table.merge(own.groupby([rows[key] for key in keys]).median().reset_index(), on=keys, how="left")
    return sort_cells(table, leading=["metric", "length"])


def pareto_points(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (metric, length, cell): mean stored KV MiB against the summary's headline score and its interval."""
    keys = ["metric", "length", *CELL]
    rows = with_budget_labels(rows)
    kv = rows[~rows["refused"]].groupby(keys)["kv_bytes"].mean().div(MIB).rename("kv_mib").reset_index()
    points = summary(rows)
    if points.empty:
        return points
    points = points[[*keys, *interval_columns(MEAN_OVER_TASKS)]].merge(kv, on=keys, how="left")
    return points.dropna(subset=["kv_mib", MEAN_OVER_TASKS])


def cache_traces(rows: pd.DataFrame, points: int = 64) -> pd.DataFrame:
    """Per (task, length, method, budget): the mean over its rows of the bytes held against tokens generated (each
    row's `kv_trace`, interpolated onto `points` evenly spaced token counts up to the cell's longest answer; a row
    counts only up to its own last token). Empty when no row carries a trace of more than one point."""
    if "kv_trace" not in rows.columns:
        return pd.DataFrame()
    traced = with_budget_labels(rows[~rows["refused"]])
    traced = traced[traced["kv_trace"].map(lambda trace: isinstance(trace, list) and len(trace) > 1)]
    if traced.empty:
        return pd.DataFrame()
    frames = []
    for (task, length, label, budget), cell in traced.groupby(["task", "length", "method_label", "budget_label"]):
        traces = [np.asarray(trace, dtype=float) for trace in cell["kv_trace"]]
        grid = np.linspace(0, max(trace[-1, 0] for trace in traces), points)
        held = np.full((len(traces), points), np.nan)
        for i, trace in enumerate(traces):
            inside = grid <= trace[-1, 0]
            held[i, inside] = np.interp(grid[inside], trace[:, 0], trace[:, 1])
        frames.append(
            pd.DataFrame(
                {
                    "task": task,
                    "length": length,
                    "method_label": label,
                    "budget_label": budget,
                    "tokens": grid,
                    "kv_mib": np.nanmean(held, axis=0) / MIB,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def latency(rows: pd.DataFrame) -> pd.DataFrame:
    """Medians of timings and means of KV sizes per (length, cell), with the device peaks where tracked.

    Split by length because prefill and decode cost grow with context: a median across lengths
    would compare nothing. Device peaks are maxima, being peaks; they are missing on CPU, and a
    memory column no row fills (old stores, CPU runs) is left out. Cells whose rows carry no
    measurements at all (e.g. lm-eval scores) are left out.
    """
    scored = with_budget_labels(rows[~rows["refused"]].copy())
    tokens = scored["new_tokens"].where(scored["new_tokens"] > 0)
    scored["decode_ms_per_token"] = 1000 * scored["decode_s"] / tokens
    mib = {
        "kv_mib": "kv_bytes",
        "kv_peak_mib": "kv_bytes_peak",
        "kv_final_mib": "kv_bytes_final",
        "kv_full_mib": "kv_bytes_full",
        "prefill_peak_mib": "prefill_peak_memory_bytes",
        "decode_peak_mib": "decode_peak_memory_bytes",
        "peak_mib": "peak_memory_bytes",
    }
    for name, source in mib.items():
        scored[name] = scored[source] / MIB
    table = (
        scored.groupby(["length", *CELL])
        .agg(
            prefill_s=("prefill_s", "median"),
            compress_s=("compress_s", "median"),
            decode_s=("decode_s", "median"),
            decode_ms_per_token=("decode_ms_per_token", "median"),
            decode_tokens_per_s=("decode_tokens_per_s", "median"),
            kv_mib=("kv_mib", "mean"),
            kv_peak_mib=("kv_peak_mib", "mean"),
            kv_final_mib=("kv_final_mib", "mean"),
            kv_full_mib=("kv_full_mib", "mean"),
            prefill_peak_mib=("prefill_peak_mib", "max"),
            decode_peak_mib=("decode_peak_mib", "max"),
            peak_mib=("peak_mib", "max"),
        )
        .reset_index()
        .dropna(how="all", subset=["prefill_s", "compress_s", "decode_s", *mib])
    )
    optional = ["kv_peak_mib", "kv_final_mib", "decode_tokens_per_s", "prefill_peak_mib", "decode_peak_mib", "peak_mib"]
    table = table.drop(columns=[name for name in optional if table[name].isna().all()])
    return sort_cells(table, leading=["length"])


def sample_lengths(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (task, length cap) of data-set rows (those with `sample_tokens`): samples, how many were cut to the cap
    (middle truncation) or skipped (`--over-length skip`), and the samples' own lengths before any cut (median and
    longest). Each sample counts once, however many cells ran it."""
    if "sample_tokens" not in rows.columns:
        return pd.DataFrame()
    measured = rows[pd.to_numeric(rows["sample_tokens"], errors="coerce").notna()]
    if measured.empty:
        return pd.DataFrame()
    before = pd.to_numeric(measured.get("truncated_from"), errors="coerce") if "truncated_from" in measured else None
    own = pd.to_numeric(measured["sample_tokens"], errors="coerce")
    skipped = measured["skipped"] if "skipped" in measured.columns else pd.Series(False, index=measured.index)
    per_sample = (
        measured.assign(
            _own=own if before is None else before.fillna(own),
            _truncated=False if before is None else before.notna(),
            _skipped=skipped.map(lambda value: value is True),
        )
        .groupby(["task", "length", "sample_id"])
        .agg(own=("_own", "max"), truncated=("_truncated", "any"), skipped=("_skipped", "any"))
        .reset_index()
    )
    table = (
        per_sample.groupby(["task", "length"])
        .agg(
            samples=("sample_id", "size"),
            truncated=("truncated", "sum"),
            skipped=("skipped", "sum"),
            own_median=("own", "median"),
            own_max=("own", "max"),
        )
        .reset_index()
    )
    return table.sort_values(["task", "length"]).reset_index(drop=True)


# A metric whose rows hold at most this many distinct depths (needle:essays' evenly spaced grid) is shown at each
# depth; more (generated needles at drawn depths) are binned to deciles.
MAX_EXACT_DEPTHS = 11


def depth_levels(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows that carry a needle depth (needle:essays, niah_*, passkey, ...), refused cells left out, with
    `depth_bin` (a number that sorts: the depth itself, or the decile's lower edge) and `depth_name` (`25%`,
    `20–30%`). Depth is the first needle's position in the context, in percent."""
    placed = with_budget_labels(rows[rows["depth"].notna() & ~rows["refused"]].copy())
    # Depths are in percent; stores written before needle:essays recorded percent hold its depths as fractions
    # (every depth of the task at most 1): those are read as fractions.
    needle = placed["task"].astype(str).str.startswith("needle:")
    fraction = needle & (placed.groupby("task")["depth"].transform("max") <= 1)
    placed.loc[fraction, "depth"] = placed.loc[fraction, "depth"] * 100
    if placed.empty:
        return placed.assign(depth_bin=pd.Series(dtype=float), depth_name=pd.Series(dtype=object))
    exact = placed.groupby("metric")["depth"].transform("nunique") <= MAX_EXACT_DEPTHS
    decile = (placed["depth"] // 10).clip(0, 9) * 10
    placed["depth_bin"] = placed["depth"].where(exact, decile)
    placed["depth_name"] = [
        f"{depth:g}%" if keep else f"{low:g}–{low + 10:g}%" for depth, low, keep in zip(placed["depth"], decile, exact)
    ]
    return placed


def depth_rows(placed: pd.DataFrame) -> pd.DataFrame:
    """Every depth level a metric's grid shows, in order: its depths, or all ten deciles."""
    levels = placed[["depth_bin", "depth_name"]].drop_duplicates().sort_values("depth_bin")
    if levels["depth_name"].str.contains("–").any():
        levels = pd.DataFrame(
            {"depth_bin": [10.0 * d for d in range(10)], "depth_name": [f"{10 * d}–{10 * d + 10}%" for d in range(10)]}
        )
    return levels.reset_index(drop=True)


def depth_grid(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: the mean score and n per (cell, depth level, length), the needle-in-a-haystack grid."""
    placed = depth_levels(rows)
    grids: dict[str, pd.DataFrame] = {}
    for metric, group in placed.groupby("metric", sort=True):
        grid = (
            group.groupby([*CELL, "depth_bin", "depth_name", "length"])["score"]
            .agg(score="mean", n="size")
            .reset_index()
        )
        # depth and length within each cell: sort_cells is stable
        grids[str(metric)] = sort_cells(grid.sort_values(["depth_bin", "length"]))
    return grids


def sample_outputs(rows: pd.DataFrame) -> pd.DataFrame:
    """Every row's answer next to its references, ordered so one sample's methods sit together."""
    columns = [
        "task", "length", "sample_id", "method", "method_label", "budget", "budget_label", "metric", "score",
        "refused", "error", "output", "references",
    ]  # fmt: skip
    return sort_cells(with_budget_labels(rows)[columns], leading=["task", "length", "sample_id"])

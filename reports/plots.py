"""Plots of a run, saved as PNG files.

Figures are drawn on Agg canvases made here, never through pyplot's global state, so rendering a
report needs no display and leaks no figures when a process renders many runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kvbench.reports import tables
from kvbench.reports.lengths import LengthAxis
from kvbench.reports.tables import MEAN_OVER_TASKS

DPI = 110
STYLE = "whitegrid"
REFERENCE_LINE = {"color": "black", "linestyle": "--"}
REFERENCE_BAND = {"color": "black", "alpha": 0.08, "linewidth": 0}
REFERENCE_POINT = {"color": "black", "marker": "*", "markersize": 12, "linestyle": "none"}
# Filled markers that stay distinct at small sizes; the reference has its own style.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "8")
# Sideways nudge between neighbouring methods, as a fraction of a panel's x span, so lines that coincide
# (e.g. every method at 0 on a hard task) stay apart and their error bars readable.
DODGE = 0.018
ERROR_BAR = {"capsize": 2.5, "elinewidth": 0.9, "markersize": 5}
SCORE, SCORE_LO, SCORE_HI = tables.interval_columns("score")


@dataclass(frozen=True)
class Plot:
    """A saved figure and the words a reader needs to read it."""

    title: str
    caption: str
    path: Path


@dataclass(frozen=True)
class Styles:
    """One colour and marker per method label, shared by every plot; the reference is black."""

    colors: dict[str, tuple[float, float, float]]
    markers: dict[str, str]

    def line(self, label: str) -> dict:
        return {"color": self.colors[label], "marker": self.markers[label]}


def method_colors(labels: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method label; the reference is black. tab10 reads best but repeats after ten
    colours, so larger sweeps get evenly spaced hues."""
    others = [name for name in tables.method_order(labels) if not tables.is_reference(name)]
    palette = "tab10" if len(others) <= 10 else "husl"
    colors = dict(zip(others, sns.color_palette(palette, max(len(others), 1))))
    colors.update({name: (0.0, 0.0, 0.0) for name in labels if tables.is_reference(name)})
    return colors


def method_styles(labels: list[str]) -> Styles:
    """Colours and markers by label, so two configurations of one method are two distinguishable lines."""
    ordered = tables.method_order(labels)
    markers = {name: MARKERS[rank % len(MARKERS)] for rank, name in enumerate(ordered)}
    return Styles(colors=method_colors(ordered), markers=markers)


def draw_all(rows: pd.DataFrame, plots_dir: Path, lengths: LengthAxis | None = None) -> list[Plot]:
    """Every plot the run's rows support, written under `plots_dir`; `lengths` names the rows' lengths (a cap, a
    bin) in the titles."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    lengths = lengths or LengthAxis()
    styles = method_styles(list(rows["method_label"]))
    plots = [
        score_vs_budget(rows, styles, plots_dir / "score_vs_budget.png", lengths),
        quality_vs_budget(rows, styles, plots_dir / "quality_vs_budget.png", lengths),
        score_vs_kv_bytes(rows, styles, plots_dir / "score_vs_kv_bytes.png", lengths),
        cache_vs_generated(rows, styles, plots_dir / "cache_vs_generated.png", lengths),
    ]
    placed = tables.depth_levels(rows)
    for metric, group in placed.groupby("metric", sort=True):
        plots.append(needle_heatmaps(group, str(metric), plots_dir / f"needle_depth_{metric}.png", lengths))
    return [plot for plot in plots if plot is not None]


def _figure(panels: int, max_cols: int, width: float, height: float) -> tuple[Figure, list]:
    cols = min(panels, max_cols)
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(width * cols, height * rows + 0.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    with sns.axes_style(STYLE):
        axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes[:panels]


def _legend(figure: Figure, labels: list[str], styles: Styles, reference: dict) -> None:
    """One legend for all panels; `reference` styles the `full` entry like its panels draw it."""
    handles = [
        Line2D([], [], label=name, **reference)
        if tables.is_reference(name)
        else Line2D([], [], label=name, **styles.line(name))
        for name in labels
    ]
    figure.legend(handles=handles, loc="outside upper center", ncols=_legend_columns(figure, labels), frameon=False)


# Width of one character of legend text and of an entry's handle and padding, in inches (10 pt DejaVu Sans).
LEGEND_CHAR_IN = 0.085
LEGEND_ENTRY_IN = 0.75


def wrap_label(text: str, width: int) -> str:
    """A method label on lines of at most about `width` characters, broken after its `:` separators (never inside
    an option), so a long label (`decoding:base_options=window=16:interval=32`) stays inside its panel's title."""
    lines = [""]
    for part in text.replace(":", ":\n").split("\n"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _legend_columns(figure: Figure, labels: list[str]) -> int:
    """As many legend columns as fit the figure's width at the longest label, at most six: long method labels
    (`decoding:base=...:interval=32`) wrap to more rows instead of running off the figure."""
    entry = LEGEND_ENTRY_IN + LEGEND_CHAR_IN * max((len(label) for label in labels), default=1)
    return max(1, min(len(labels), 6, int(figure.get_figwidth() // entry)))


def _score_limits(axes, values: pd.Series, metric: str) -> None:
    """Fix the axis to 0–100 for percentage scores, so panels compare at a glance (perplexity is no percentage)."""
    if metric not in tables.LOWER_IS_BETTER and values.dropna().between(0, 100).all():
        axes.set_ylim(-3, 103)


def _dodge(labels: list[str], xs: pd.Series) -> dict[str, float]:
    """Each compressed method's sideways offset: centred on the true budget, a fixed share of the x span apart."""
    span = float(xs.max() - xs.min()) if len(xs) else 0.0
    step = DODGE * (span if span > 0 else 1.0)
    return {name: (rank - (len(labels) - 1) / 2) * step for rank, name in enumerate(labels)}


def _error_bars(ax, points: pd.DataFrame, x: str, y: str, style: dict, offset: float = 0.0) -> None:
    """A line through the means with each point's interval as a vertical bar; points without one get none."""
    points = points.sort_values(x)
    below = (points[y] - points[y + tables.LO]).clip(lower=0).fillna(0)
    above = (points[y + tables.HI] - points[y]).clip(lower=0).fillna(0)
    ax.errorbar(points[x] + offset, points[y], yerr=[below, above], **{**ERROR_BAR, **style})


BUDGET_AXES = {False: "budget (fraction of full KV)", True: "budget (tokens per KV head)"}


def _budget_panel(ax, means: pd.DataFrame, styles: Styles, metric: str, title: str, tokens: bool = False) -> None:
    """Mean score against budget with intervals, one line per compressed configuration; `full` is a
    horizontal reference line inside its interval band. `means` holds budgets of one kind: fractions, or token
    budgets (`tokens`), whose x is the token count."""
    compressed = means[~means["method_label"].map(tables.is_reference)]
    labels = tables.method_order(compressed["method_label"])
    offsets = _dodge(labels, compressed["budget"])
    for name in labels:
        _error_bars(
            ax, compressed[compressed["method_label"] == name], "budget", SCORE, styles.line(name), offsets[name]
        )
    for _, point in means[means["method_label"].map(tables.is_reference)].iterrows():
        ax.axhline(point[SCORE], linewidth=1.2, **REFERENCE_LINE)
        if pd.notna(point[SCORE_LO]):
            ax.axhspan(point[SCORE_LO], point[SCORE_HI], **REFERENCE_BAND)
    _score_limits(ax, means[[SCORE, SCORE_LO, SCORE_HI]].stack(), metric)
    ticks = compressed[["budget", "budget_label"]].drop_duplicates().sort_values("budget")
    ax.set_xticks(ticks["budget"], ticks["budget_label"])  # ticks at the true budgets, not the nudges
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(BUDGET_AXES[tokens])
    ax.set_ylabel("mean score")


def budget_panels(means: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, bool, pd.DataFrame]]:
    """One panel per value of `keys` and budget kind: fractions and token budgets are never drawn on one x axis.
    A panel holds its kind's compressed cells and the reference (`full`), which is a line in every panel."""
    kinds = means.assign(_tokens=tables.is_token_budget(means["budget_label"]))
    reference = kinds["method_label"].map(tables.is_reference)
    panels = []
    for key, group in kinds.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        compressed = group[~reference.loc[group.index]]
        for tokens in sorted(set(compressed["_tokens"])) or [False]:
            chosen = group[reference.loc[group.index] | (group["_tokens"] == tokens)]
            panels.append((key, tokens, chosen.drop(columns="_tokens")))
    return panels


def _kind(tokens: bool) -> str:
    return ", token budgets" if tokens else ""


def score_vs_budget(rows: pd.DataFrame, styles: Styles, path: Path, lengths: LengthAxis | None = None) -> Plot | None:
    """Mean score against budget, one panel per (task, metric, length) and budget kind: a task may report several
    metrics, lengths are never pooled, and a token budget is no fraction."""
    lengths = lengths or LengthAxis()
    means = tables.task_intervals(rows).dropna(subset=[SCORE])
    if means.empty:
        return None
    panels = budget_panels(means, ["task", "metric", "length"])
    figure, axes = _figure(len(panels), 3, 4.2, 3.1)
    for ax, ((task, metric, length), tokens, panel) in zip(axes, panels):
        title = f"{task} @ {lengths.title(length)}\n({tables.metric_label(metric)}{_kind(tokens)})"
        _budget_panel(ax, panel, styles, metric, title, tokens)
    _legend(figure, tables.method_order(means["method_label"]), styles, REFERENCE_LINE)
    figure.savefig(path)
    return Plot(
        title="Score vs budget",
        caption="Mean score per task, metric and context length at each budget, with 95% bootstrap intervals as "
        "error bars; methods are nudged sideways so coinciding lines stay apart. The dashed line and grey band "
        "are the uncompressed full cache and its interval. Token budgets (128t: tokens per KV head) get panels of "
        "their own, with tokens on the x axis; fractions of the full cache's bytes get theirs.",
        path=path,
    )


def quality_vs_budget(rows: pd.DataFrame, styles: Styles, path: Path, lengths: LengthAxis | None = None) -> Plot | None:
    """One panel per generation-quality metric (ROUGE, BERTScore, perplexity), length and budget kind, over every
    task reporting it."""
    lengths = lengths or LengthAxis()
    quality = tables.summary(rows[rows["metric"].isin(tables.QUALITY_METRICS)])
    if quality.empty:
        return None
    means = quality.rename(columns=dict(zip(tables.interval_columns(MEAN_OVER_TASKS), (SCORE, SCORE_LO, SCORE_HI))))
    means = means.dropna(subset=[SCORE])
    order = {metric: rank for rank, metric in enumerate(tables.QUALITY_METRICS)}
    panels = sorted(budget_panels(means, ["metric", "length"]), key=lambda panel: (order[panel[0][0]], *panel[:2]))
    if not panels:
        return None
    figure, axes = _figure(len(panels), 3, 4.2, 3.1)
    for ax, ((metric, length), tokens, panel) in zip(axes, panels):
        title = f"{tables.metric_label(metric)} @ {lengths.title(length)}\n{_kind(tokens).lstrip(', ')}".strip()
        _budget_panel(ax, panel, styles, metric, title, tokens)
        if metric in tables.LOWER_IS_BETTER:
            ax.set_ylabel("mean (lower is better)")
    _legend(figure, tables.method_order(means["method_label"]), styles, REFERENCE_LINE)
    figure.savefig(path)
    return Plot(
        title="Generation quality vs budget",
        caption="Mean of each quality metric per context length at each budget, with 95% bootstrap intervals "
        "(perplexity: lower is better); the dashed line and grey band are the uncompressed full cache. Token "
        "budgets get panels of their own.",
        path=path,
    )


def score_vs_kv_bytes(rows: pd.DataFrame, styles: Styles, path: Path, lengths: LengthAxis | None = None) -> Plot | None:
    """The Pareto view: headline score against the KV bytes a method actually stored, per metric and length; token
    and fractional budgets share this axis, since both are measured in bytes here."""
    lengths = lengths or LengthAxis()
    points = tables.pareto_points(rows)
    if points.empty:
        return None
    panels = sorted(points.groupby(["metric", "length"]).groups)
    figure, axes = _figure(len(panels), 2, 5.5, 4.0)
    for ax, (metric, length) in zip(axes, panels):
        panel = points[(points["metric"] == metric) & (points["length"] == length)]
        for label in tables.method_order(panel["method_label"]):
            series = panel[panel["method_label"] == label]
            style = REFERENCE_POINT if tables.is_reference(label) else styles.line(label)
            for _, kind in series.groupby(tables.is_token_budget(series["budget_label"])):
                _error_bars(ax, kind, "kv_mib", MEAN_OVER_TASKS, style)  # one line per budget kind
            for _, point in series.iterrows():
                ax.annotate(
                    point["budget_label"],
                    (point["kv_mib"], point[MEAN_OVER_TASKS]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=styles.colors[label],
                )
        _score_limits(ax, panel[tables.interval_columns(MEAN_OVER_TASKS)].stack(), metric)
        ax.set_xlim(left=0)
        ax.set_title(f"{tables.metric_label(metric)} @ {lengths.title(length)}", fontsize=10)
        ax.set_xlabel("mean stored KV cache (MiB)")
        ax.set_ylabel(MEAN_OVER_TASKS)
    _legend(figure, tables.method_order(points["method_label"]), styles, REFERENCE_POINT)
    figure.savefig(path)
    return Plot(
        title="Score vs stored KV bytes",
        caption="Mean over tasks against mean stored KV cache per (method, budget) and context length, labelled "
        "with the budget (128t: tokens per KV head), with 95% bootstrap intervals; up and to the left is better "
        "(down and to the left for perplexity). The star is the uncompressed full cache.",
        path=path,
    )


# One line style per budget in the cache-while-generating plot (colours and markers are the methods').
BUDGET_LINES = ({"linestyle": "-"}, {"linestyle": "--"}, {"linestyle": ":"}, {"linestyle": "-."})
# Markers every this many grid points, so lines that coincide (equal budgets) still show every method.
TRACE_MARKS = 8


def cache_vs_generated(
    rows: pd.DataFrame, styles: Styles, path: Path, lengths: LengthAxis | None = None
) -> Plot | None:
    """Bytes the cache held against tokens generated, per (method, budget): the mean over a cell's rows of each
    row's `kv_trace`, interpolated onto a common grid of generated tokens, one panel per task and length. The
    legend sits under its panel, so it hides no line however many cells and however long their labels."""
    lengths = lengths or LengthAxis()
    traces = tables.cache_traces(rows)
    if traces.empty:
        return None
    panels = sorted(traces.groupby(["task", "length"]).groups)
    figure, axes = _figure(len(panels), 2, 5.5, 4.0)
    for ax, (task, length) in zip(axes, panels):
        panel = traces[(traces["task"] == task) & (traces["length"] == length)]
        compressed = panel[~panel["method_label"].map(tables.is_reference)]
        budgets = sorted(
            compressed["budget_label"].unique(), key=lambda text: (text.endswith("t"), float(text.rstrip("t")))
        )
        cells = panel[["method_label", "budget_label"]].drop_duplicates()
        cells = tables.sort_cells(cells.assign(budget=cells["budget_label"].str.rstrip("t").astype(float)))
        for label, budget in zip(cells["method_label"], cells["budget_label"]):
            series = panel[(panel["method_label"] == label) & (panel["budget_label"] == budget)]
            if tables.is_reference(label):
                style = dict(REFERENCE_LINE)
            else:
                style = {**styles.line(label), **BUDGET_LINES[budgets.index(budget) % len(BUDGET_LINES)]}
                style.update(markevery=TRACE_MARKS, markersize=4)
            ax.plot(series["tokens"], series["kv_mib"], label=f"{label} @ {budget}", linewidth=1.2, **style)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{task} @ {lengths.title(length)}", fontsize=10)
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("KV cache held (MiB)")
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(0, -0.14), ncols=1)
    figure.savefig(path)
    return Plot(
        title="Cache size while generating",
        caption="What the cache held (compressed context, decode state and the raw tail) after each generated "
        "token, mean over each (method, budget)'s rows (colour and marker: method, line style: budget, 128t = "
        "128 tokens per KV head); a decode-time method's saw-tooth is its compressions.",
        path=path,
    )


def needle_heatmaps(needles: pd.DataFrame, metric: str, path: Path, lengths: LengthAxis | None = None) -> Plot:
    """Mean score by needle depth × context length: one panel per (method, budget), rows from
    `tables.depth_levels` (each depth of an evenly spaced grid, else deciles).

    One row of panels per method label with budgets left to right, on one colour scale, so a method's
    blind spots (e.g. the middle of long contexts) line up with the others'.
    """
    lengths = lengths or LengthAxis()
    methods = tables.method_order(needles["method_label"])
    cells = tables.sort_cells(needles[tables.CELL].drop_duplicates())
    budgets = {name: list(cells.loc[cells["method_label"] == name, "budget_label"]) for name in methods}
    cols = max(len(values) for values in budgets.values())
    columns = sorted(needles["length"].unique())
    levels = tables.depth_rows(needles)
    panel_width = 0.55 * len(columns) + 2.0
    width = panel_width * cols + 1.0
    figure = Figure(figsize=(width, 3.0 * len(methods) + 0.3), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(methods), cols, squeeze=False)
    means = needles.groupby(["method_label", "budget_label", "depth_bin", "length"])["score"].mean()
    image = None
    for row, method in enumerate(methods):
        for col in range(cols):
            ax = grid[row][col]
            if col >= len(budgets[method]):
                ax.set_visible(False)
                continue
            budget = budgets[method][col]
            cell = means.loc[(method, budget)].unstack("length").reindex(index=levels["depth_bin"], columns=columns)
            sns.heatmap(
                cell,
                vmin=0,
                vmax=100,
                cmap="RdYlGn",
                annot=len(columns) <= 6,
                fmt=".0f",
                annot_kws={"fontsize": 7},
                cbar=False,
                xticklabels=[lengths.name(length) for length in columns],
                yticklabels=list(levels["depth_name"]),
                ax=ax,
            )
            ax.set_facecolor("#ececec")
            image = ax.collections[0]
            ax.set_title(wrap_label(f"{method} @ {budget}", int(panel_width * 12)), fontsize=9)
            ax.set_xlabel("context length (tokens)" if row == len(methods) - 1 else "")
            ax.set_ylabel("needle depth" if col == 0 else "")
            ax.tick_params(labelsize=7)
    figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.6, label="mean score")
    figure.savefig(path)
    tasks = ", ".join(sorted(needles["task"].unique()))
    return Plot(
        title=f"Needle depth × length ({metric})",
        caption=f"Mean score of {tasks} by needle depth (the first needle's position in the context) and context "
        "length, one panel per method and budget; grey cells have no sample.",
        path=path,
    )

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
from kvbench.reports.tables import MEAN_OVER_TASKS, REFERENCE_METHOD

DPI = 110
STYLE = "whitegrid"
REFERENCE_LINE = {"color": "black", "linestyle": "--"}
REFERENCE_POINT = {"color": "black", "marker": "*", "markersize": 12, "linestyle": "none"}
DECILE_LABELS = [f"{10 * decile}–{10 * decile + 10}" for decile in range(10)]


@dataclass(frozen=True)
class Plot:
    """A saved figure and the words a reader needs to read it."""

    title: str
    caption: str
    path: Path


def method_colors(methods: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method, shared by every plot; the reference is black. tab10 reads best but
    repeats after ten colours, so larger sweeps get evenly spaced hues."""
    others = [name for name in tables.method_order(methods) if name != REFERENCE_METHOD]
    palette = "tab10" if len(others) <= 10 else "husl"
    colors = dict(zip(others, sns.color_palette(palette, max(len(others), 1))))
    colors[REFERENCE_METHOD] = (0.0, 0.0, 0.0)
    return colors


def draw_all(rows: pd.DataFrame, plots_dir: Path) -> list[Plot]:
    """Every plot the run's rows support, written under `plots_dir`."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    colors = method_colors(list(rows["method"]))
    scored = rows[~rows["refused"]]
    plots = [
        score_vs_budget(scored, colors, plots_dir / "score_vs_budget.png"),
        quality_vs_budget(scored, colors, plots_dir / "quality_vs_budget.png"),
        score_vs_kv_bytes(rows, colors, plots_dir / "score_vs_kv_bytes.png"),
    ]
    needles = tables.needle_depths(rows)
    for metric, group in needles.groupby("metric", sort=True):
        plots.append(needle_heatmaps(group, str(metric), plots_dir / f"needle_depth_{metric}.png"))
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


def _legend(figure: Figure, methods: list[str], colors: dict, reference: dict) -> None:
    """One legend for all panels; `reference` styles the `full` entry like its panels draw it."""
    handles = [
        Line2D([], [], label=name, **reference)
        if name == REFERENCE_METHOD
        else Line2D([], [], color=colors[name], marker="o", label=name)
        for name in methods
    ]
    figure.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), frameon=False)


def _score_limits(axes, values: pd.Series, metric: str) -> None:
    """Fix the axis to 0–100 for percentage scores, so panels compare at a glance (perplexity is no percentage)."""
    if metric not in tables.LOWER_IS_BETTER and values.between(0, 100).all():
        axes.set_ylim(-3, 103)


def _budget_panel(ax, means: pd.DataFrame, colors: dict, metric: str, title: str) -> None:
    """Mean score against budget, one line per compressed method; `full` is a horizontal reference line."""
    compressed = means[means["method"] != REFERENCE_METHOD]
    if not compressed.empty:
        sns.lineplot(
            data=compressed,
            x="budget",
            y="score",
            hue="method",
            palette={name: colors[name] for name in compressed["method"].unique()},
            marker="o",
            errorbar=None,
            legend=False,
            ax=ax,
        )
    for score in means.loc[means["method"] == REFERENCE_METHOD, "score"]:
        ax.axhline(score, linewidth=1.2, **REFERENCE_LINE)
    _score_limits(ax, means["score"], metric)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("budget (fraction of full KV)")
    ax.set_ylabel("mean score")


def score_vs_budget(scored: pd.DataFrame, colors: dict, path: Path) -> Plot | None:
    """Mean score against budget, one panel per (task, metric): a task may report several metrics."""
    if scored.empty:
        return None
    means = scored.groupby(["task", "metric", "method", "budget"])["score"].mean().reset_index()
    panels = sorted(means.groupby(["task", "metric"]).groups)
    figure, axes = _figure(len(panels), 3, 4.2, 3.1)
    for ax, (task, metric) in zip(axes, panels):
        panel = means[(means["task"] == task) & (means["metric"] == metric)]
        _budget_panel(ax, panel, colors, metric, f"{task} ({tables.metric_label(metric)})")
    _legend(figure, tables.method_order(means["method"]), colors, REFERENCE_LINE)
    figure.savefig(path)
    return Plot(
        title="Score vs budget",
        caption="Mean score per task and metric at each budget; the dashed line is the uncompressed full cache.",
        path=path,
    )


def quality_vs_budget(scored: pd.DataFrame, colors: dict, path: Path) -> Plot | None:
    """One panel per generation-quality metric (ROUGE, BERTScore, perplexity), over every task reporting it."""
    quality = scored[scored["metric"].isin(tables.QUALITY_METRICS)]
    if quality.empty:
        return None
    means = quality.groupby(["metric", "method", "budget"])["score"].mean().reset_index()
    metrics = [metric for metric in tables.QUALITY_METRICS if metric in set(means["metric"])]
    figure, axes = _figure(len(metrics), 3, 4.2, 3.1)
    for ax, metric in zip(axes, metrics):
        _budget_panel(ax, means[means["metric"] == metric], colors, metric, tables.metric_label(metric))
        if metric in tables.LOWER_IS_BETTER:
            ax.set_ylabel("mean (lower is better)")
    _legend(figure, tables.method_order(means["method"]), colors, REFERENCE_LINE)
    figure.savefig(path)
    return Plot(
        title="Generation quality vs budget",
        caption="Mean of each quality metric at each budget (perplexity: lower is better); the dashed line is "
        "the uncompressed full cache.",
        path=path,
    )


def score_vs_kv_bytes(rows: pd.DataFrame, colors: dict, path: Path) -> Plot | None:
    """The Pareto view: headline score against the KV bytes a method actually stored."""
    points = tables.pareto_points(rows)
    if points.empty:
        return None
    metrics = sorted(points["metric"].unique())
    figure, axes = _figure(len(metrics), 2, 5.5, 4.0)
    for ax, metric in zip(axes, metrics):
        metric_points = points[points["metric"] == metric]
        for method in tables.method_order(metric_points["method"]):
            series = metric_points[metric_points["method"] == method].sort_values("kv_mib")
            style = REFERENCE_POINT if method == REFERENCE_METHOD else {"color": colors[method], "marker": "o"}
            ax.plot(series["kv_mib"], series[MEAN_OVER_TASKS], **style)
            for _, point in series.iterrows():
                ax.annotate(
                    f"{point['budget']:g}",
                    (point["kv_mib"], point[MEAN_OVER_TASKS]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colors[method],
                )
        _score_limits(ax, metric_points[MEAN_OVER_TASKS], metric)
        ax.set_xlim(left=0)
        ax.set_title(tables.metric_label(metric), fontsize=10)
        ax.set_xlabel("mean stored KV cache (MiB)")
        ax.set_ylabel(MEAN_OVER_TASKS)
    _legend(figure, tables.method_order(points["method"]), colors, REFERENCE_POINT)
    figure.savefig(path)
    return Plot(
        title="Score vs stored KV bytes",
        caption="Mean over tasks against mean stored KV cache per (method, budget), labelled with the budget; "
        "up and to the left is better (down and to the left for perplexity). The star is the uncompressed full cache.",
        path=path,
    )


def needle_heatmaps(needles: pd.DataFrame, metric: str, path: Path) -> Plot:
    """Mean score by needle depth decile × context length: one panel per (method, budget).

    One row of panels per method with budgets left to right, on one colour scale, so a method's
    blind spots (e.g. the middle of long contexts) line up with the others'.
    """
    methods = tables.method_order(needles["method"])
    budgets = {name: sorted(needles.loc[needles["method"] == name, "budget"].unique()) for name in methods}
    cols = max(len(values) for values in budgets.values())
    lengths = sorted(needles["length"].unique())
    width = (0.55 * len(lengths) + 2.0) * cols + 1.0
    figure = Figure(figsize=(width, 3.0 * len(methods) + 0.3), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(methods), cols, squeeze=False)
    means = needles.groupby(["method", "budget", "decile", "length"])["score"].mean()
    image = None
    for row, method in enumerate(methods):
        for col in range(cols):
            ax = grid[row][col]
            if col >= len(budgets[method]):
                ax.set_visible(False)
                continue
            budget = budgets[method][col]
            cell = means.loc[(method, budget)].unstack("length").reindex(index=range(10), columns=lengths)
            sns.heatmap(
                cell,
                vmin=0,
                vmax=100,
                cmap="RdYlGn",
                annot=len(lengths) <= 6,
                fmt=".0f",
                annot_kws={"fontsize": 7},
                cbar=False,
                yticklabels=DECILE_LABELS,
                ax=ax,
            )
            ax.set_facecolor("#ececec")
            image = ax.collections[0]
            ax.set_title(f"{method} @ {budget:g}", fontsize=9)
            ax.set_xlabel("context length (tokens)" if row == len(methods) - 1 else "")
            ax.set_ylabel("needle depth (%)" if col == 0 else "")
            ax.tick_params(labelsize=7)
    figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.6, label="mean score")
    figure.savefig(path)
    tasks = ", ".join(sorted(needles["task"].unique()))
    return Plot(
        title=f"Needle depth × length ({metric})",
        caption=f"Mean score of {tasks} by needle depth decile and context length; grey cells have no sample.",
        path=path,
    )

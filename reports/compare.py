"""Paired comparisons between any two configurations of one store (`kvbench compare DIR --pair A B`).

The report judges every cell against `full`. A researcher choosing between a method and its base, or a learned
allocation and AdaKV, needs A − B on the same samples: two means whose intervals overlap can still differ with
every sample agreeing in sign, and only the paired difference shows it. The rules are the report's (DESIGN §5):
metrics and lengths are never pooled, a refusal drops the sample from the pair instead of scoring zero, tasks
weigh equally, and all columns of one comparison share one set of bootstrap draws (`intervals.bootstrap`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.reports import intervals
from kvbench.reports.errors import ReportError
from kvbench.reports.store import load_run
from kvbench.reports.tables import LOWER_IS_BETTER, SAMPLE, metric_label, score_matrix

ALL_TASKS = "all tasks"
SIDES = ("first", "second", "difference")


def paired_differences(rows: pd.DataFrame, first: str, second: str) -> pd.DataFrame:
    """One line per (metric, length, budget, task), plus one over all tasks where there are several: each side's
    mean with its interval and n, and first − second with its interval over the samples both scored.

    `second` is taken at the same budget as `first`; a configuration stored at one budget only (`full` at b = 1)
    is compared at that budget with every budget of the other.
    """
    parts = []
    for (metric, length), group in rows.groupby(["metric", "length"], sort=True):
        labels = set(group["method_label"])
        if first not in labels or second not in labels:
            continue
        matrix = score_matrix(group)
        tasks = matrix.index.get_level_values("task").to_numpy()
        for budget, other in _budget_pairs(matrix.columns, first, second):
            a = matrix[(first, budget)].to_numpy(dtype=float)
            b = matrix[(second, other)].to_numpy(dtype=float)
            values = np.column_stack([a, b, a - b])
            scopes = [(task, tasks == task) for task in sorted(set(tasks))]
            if len(scopes) > 1:
                scopes.append((ALL_TASKS, np.ones(len(tasks), dtype=bool)))
            for task, inside in scopes:
                estimate = intervals.bootstrap(values[inside], tasks[inside])
                line = {"metric": metric, "length": length, "task": task, "budget": budget, "second_budget": other}
                for column, side in enumerate(SIDES):
                    line.update(
                        {
                            side: estimate.mean[column],
                            f"{side}:lo": estimate.lo[column],
                            f"{side}:hi": estimate.hi[column],
                            f"{side}:n": int(estimate.n[column]),
                        }
                    )
                parts.append(line)
    return pd.DataFrame(parts)


def _budget_pairs(cells: pd.Index, first: str, second: str) -> list[tuple[float, float]]:
    ours = sorted(budget for label, budget in cells if label == first)
    theirs = sorted(budget for label, budget in cells if label == second)
    if len(theirs) == 1:
        return [(budget, theirs[0]) for budget in ours]
    if len(ours) == 1:
        return [(ours[0], budget) for budget in theirs]
    return [(budget, budget) for budget in ours if budget in theirs]


def compare_markdown(run_dir: str | Path, pairs: list[tuple[str, str]]) -> str:
    """Markdown tables of each pair's paired differences, read from the run's store only."""
    rows = load_run(run_dir).rows
    labels = sorted(set(rows["method_label"]))
    out = []
    for first, second in pairs:
        for label in (first, second):
            if label not in labels:
                raise ReportError(f"no configuration '{label}' in {run_dir}; its method labels: {', '.join(labels)}")
        table = paired_differences(rows, first, second)
        if table.empty:
            raise ReportError(f"'{first}' and '{second}' share no metric, length and budget in {run_dir}")
        for (metric, length), block in table.groupby(["metric", "length"], sort=True):
            better = "lower" if metric in LOWER_IS_BETTER else "higher"
            samples = rows[(rows["metric"] == metric) & (rows["length"] == length)][SAMPLE].drop_duplicates()
            out += [
                f"{first} − {second}: {metric_label(metric)} @ {length} ({len(samples)} samples; {better} is better; "
                "95% bootstrap intervals, the difference paired by sample)",
                "",
                f"| task | budget | {_escape(first)} | {_escape(second)} | difference | n paired |",
                "|---|---|---|---|---|---|",
            ]
            digits = 2 if metric in LOWER_IS_BETTER else 1
            for line in block.to_dict("records"):
                budget = f"{line['budget']:g}"
                if line["second_budget"] != line["budget"]:
                    budget += f" vs {line['second_budget']:g}"
                cells = [_interval(line, side, digits, signed=side == "difference") for side in SIDES]
                out.append(f"| {line['task']} | {budget} | {' | '.join(cells)} | {line['difference:n']} |")
            out.append("")
    return "\n".join(out)


def _interval(line: dict, side: str, digits: int, signed: bool) -> str:
    mean, lo, hi = line[side], line[f"{side}:lo"], line[f"{side}:hi"]
    if np.isnan(mean):
        return "–"
    form = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{form.format(mean)} [{form.format(lo)}, {form.format(hi)}]"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")

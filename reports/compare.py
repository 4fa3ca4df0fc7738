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
from kvbench.reports.content import Table, _with_interval
from kvbench.reports.errors import ReportError
from kvbench.reports.lengths import length_axis
from kvbench.reports.markdown_writer import _table as markdown_table
from kvbench.reports.store import Run, as_run
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
        for ours, theirs in _budget_pairs(matrix.columns, first, second):
            a = matrix[(first, *ours)].to_numpy(dtype=float)
            b = matrix[(second, *theirs)].to_numpy(dtype=float)
            values = np.column_stack([a, b, a - b])
            scopes = [(task, tasks == task) for task in sorted(set(tasks))]
            if len(scopes) > 1:
                scopes.append((ALL_TASKS, np.ones(len(tasks), dtype=bool)))
            for task, inside in scopes:
                estimate = intervals.bootstrap(values[inside], tasks[inside])
                line = {
                    "metric": metric,
                    "length": length,
                    "task": task,
                    "budget": ours[0],
                    "budget_label": ours[1],
                    "second_budget": theirs[0],
                    "second_budget_label": theirs[1],
                }
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


Budget = tuple[float, str]  # (budget, its label): `128t` is 128 tokens per head, never the fraction 0.128 or 1


def _budget_pairs(cells: pd.Index, first: str, second: str) -> list[tuple[Budget, Budget]]:
    """Each budget of `first` with the same budget of `second` (the same label: a token budget pairs only with the
    same token budget), or with `second`'s only budget where it has one (`full`), and the other way round."""

    def order(budget: Budget) -> tuple:
        return (budget[1].endswith("t"), budget[0])

    ours = sorted(((budget, label) for name, budget, label in cells if name == first), key=order)
    theirs = sorted(((budget, label) for name, budget, label in cells if name == second), key=order)
    if len(theirs) == 1:
        return [(budget, theirs[0]) for budget in ours]
    if len(ours) == 1:
        return [(ours[0], budget) for budget in theirs]
    shared = {budget[1]: budget for budget in theirs}
    return [(budget, shared[budget[1]]) for budget in ours if budget[1] in shared]


def compare_markdown(
    run_dir: str | Path | Run, pairs: list[tuple[str, str]], length_bins: tuple[float, ...] | None = None
) -> str:
    """Markdown tables of each pair's paired differences, read from the run's store only; cells are formatted and
    written by the report's own code, so a number reads the same here as in report.md. Lengths are named as the
    report names them (a data set's cap, or with `length_bins` the bins of the samples' own lengths)."""
    run = as_run(run_dir)
    (rows, lengths), run_dir = length_axis(run.rows, length_bins), run.run_dir
    labels = sorted(set(rows["method_label"]))
    out = []
    for first, second in pairs:
        if first == second:
            raise ReportError(f"--pair {first} {first} compares a configuration with itself; name two")
        for label in (first, second):
            if label not in labels:
                raise ReportError(f"no configuration '{label}' in {run_dir}; its method labels: {', '.join(labels)}")
        table = paired_differences(rows, first, second)
        if table.empty:
            raise ReportError(f"'{first}' and '{second}' share no metric, length and budget in {run_dir}")
        for (metric, length), block in table.groupby(["metric", "length"], sort=True):
            samples = rows[(rows["metric"] == metric) & (rows["length"] == length)][SAMPLE].drop_duplicates()
            spec = ".2f" if metric in LOWER_IS_BETTER else ".1f"
            frame = pd.DataFrame(
                {
                    "task": block["task"],
                    "budget": [
                        ours + ("" if theirs == ours else f" vs {theirs}")
                        for ours, theirs in zip(block["budget_label"], block["second_budget_label"])
                    ],
                    **{
                        column: [
                            _with_interval(*values, signed_spec)
                            for values in zip(block[side], block[f"{side}:lo"], block[f"{side}:hi"])
                        ]
                        for column, side, signed_spec in (
                            (first, "first", spec),
                            (second, "second", spec),
                            ("difference", "difference", "+" + spec),
                        )
                    },
                    "n paired": block["difference:n"].astype(str),
                }
            )
            out += [
                f"{first} − {second}: {metric_label(metric)} @ {lengths.title(length)} ({len(samples)} samples; "
                "95% bootstrap intervals, the difference paired by sample)",
                "",
                *markdown_table(Table("", frame, frozenset(frame.columns[2:]))),
                "",
            ]
    return "\n".join(out + ([lengths.note] if lengths.note else []))

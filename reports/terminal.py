"""The report's summary as a plain-text table for the terminal, the last thing `kvbench run` prints.

It is the Summary table of report.md, cut to the columns a first look needs: the same `tables.summary`
numbers, formatted by the same code as the report, so the terminal and the report never disagree.
"""

from __future__ import annotations

from pathlib import Path

from kvbench.reports import tables
from kvbench.reports.content import COLUMNS, TEXT_COLUMNS, _format
from kvbench.reports.lengths import length_axis
from kvbench.reports.store import Run, as_run
from kvbench.reports.tables import MEAN_OVER_TASKS, N_SCORED

# Source columns of tables.summary (with the interval columns the score carries), in the order shown.
SHOWN = ["metric", "length", "method_label", "budget_label", MEAN_OVER_TASKS, "kv_ratio", N_SCORED, "refused"]
TITLE = (
    "Summary (the numbers of report.md): score = mean over tasks [95% CI]; "
    "KV ratio = stored / full-cache KV bytes; n = scored samples"
)


def _display(column: str) -> str:
    return TEXT_COLUMNS.get(column) or COLUMNS.get(column, (column, ""))[0]


def summary_text(run_dir: str | Path | Run, length_bins: tuple[float, ...] | None = None) -> str:
    """The run's summary table as aligned text lines, read from its result store only; with `length_bins`, by the
    bins of the samples' own lengths, as the report."""
    rows, lengths = length_axis(as_run(run_dir).rows, length_bins)
    frame = tables.summary(rows)
    if frame.empty:
        return f"{TITLE}\n(no result rows)"
    formatted = _format("summary", frame, lengths)
    shown = [_display(column) for column in SHOWN]
    body = formatted.frame[shown].rename(columns={_display(MEAN_OVER_TASKS): "score [95% CI]"})
    lines = [TITLE, *_align(body, numeric=formatted.numeric | {"score [95% CI]"})]
    return "\n".join(lines + (["", lengths.note] if lengths.note else []))  # the table ends at the blank line


def _align(frame, numeric: frozenset[str] | set[str]) -> list[str]:
    """Columns padded to their widest cell, numbers right-aligned, with a dashed rule under the header."""
    columns = list(frame.columns)
    widths = [max(len(column), *(len(value) for value in frame[column])) for column in columns]

    def line(values: list[str]) -> str:
        cells = [
            value.rjust(width) if column in numeric else value.ljust(width)
            for column, value, width in zip(columns, values, widths)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return [line(columns), rule, *(line(list(values)) for values in frame.itertuples(index=False))]

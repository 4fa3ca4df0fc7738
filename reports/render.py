"""The public entry point: one run directory in, report.md, report.html and plots/ out."""

from __future__ import annotations

from pathlib import Path

from kvbench.reports.content import build_report
from kvbench.reports.html_writer import write_html
from kvbench.reports.markdown_writer import write_markdown
from kvbench.reports.store import Run, as_run


def render_report(run_dir: str | Path | Run, length_bins: tuple[float, ...] | None = None) -> tuple[Path, Path]:
    """Render the run in `run_dir` (or the run already loaded from it) next to its results, so a report always
    travels with its data; `length_bins` (edges in tokens) groups rows by their samples' own lengths.

    Returns the paths of report.md and report.html. Raises ReportError (one line) for a
    directory that is not a readable run.
    """
    run = as_run(run_dir)
    report = build_report(run, run.run_dir / "plots", length_bins)
    markdown = write_markdown(report, run.run_dir / "report.md")
    page = write_html(report, run.run_dir / "report.html")
    return markdown, page

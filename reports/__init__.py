"""kvbench.reports: Markdown and HTML reports with plots, rendered from a run's result store only."""

from kvbench.reports.errors import ReportError
from kvbench.reports.render import render_report
from kvbench.reports.store import Run, load_run

__all__ = ["ReportError", "Run", "load_run", "render_report"]

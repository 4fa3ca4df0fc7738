"""report.md: plain tables and relative image links, readable in a terminal and on a forge.

User text (model outputs) is HTML-escaped as well as pipe-escaped, because Markdown viewers
render raw HTML: an output holding `<script>` must stay text.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

from kvbench.reports.content import Report, Table

OUTPUT_WIDTH = 80
REFERENCES_WIDTH = 40
_NEWLINES = re.compile(r"\r\n|\r|\n")


def write_markdown(report: Report, path: Path) -> Path:
    """Write `report` to `path`, linking plots relative to it so the run directory can move."""
    lines = [f"# {_escape(report.title)}", ""]
    lines += [f"> **Note:** {_escape(note)}\n" for note in report.notes]
    for section in report.sections:
        lines += [f"## {section.title}", "", _escape(section.text), ""]
        for table in section.tables:
            lines += [f"**{_escape(table.caption)}**", "", *_table(table), ""]
        for plot in section.plots:
            link = Path(os.path.relpath(plot.path, path.parent)).as_posix()
            lines += [f"![{_escape(plot.title)}]({link})", "", f"*{_escape(plot.caption)}*", ""]
    lines += ["## Per-sample outputs", "", f"{report.samples_note} Outputs and references are truncated here.", ""]
    samples = report.samples.assign(
        output=report.samples["output"].map(lambda text: _truncate(text, OUTPUT_WIDTH)),
        references=report.samples["references"].map(lambda text: _truncate(text, REFERENCES_WIDTH)),
    )
    lines += [*_table(Table("", samples, frozenset({"length", "sample", "budget", "score"}))), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _table(table: Table) -> list[str]:
    header = [_escape(str(name)) for name in table.frame.columns]
    align = ["---:" if name in table.numeric else "---" for name in table.frame.columns]
    body = [[_escape(cell) for cell in row] for row in table.frame.itertuples(index=False)]
    return ["| " + " | ".join(cells) + " |" for cells in [header, align, *body]]


def _escape(text: str) -> str:
    """One table cell on one line: HTML-escaped, pipes escaped, newlines shown as ↵."""
    return _NEWLINES.sub(" ↵ ", html.escape(text, quote=False)).replace("|", "\\|")


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"

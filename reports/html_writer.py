"""report.html: one self-contained file that opens offline and can be mailed or archived.

Plots are embedded as base64 data URIs and the CSS is inline, so the page fetches nothing;
every piece of text goes through html.escape, since model outputs are arbitrary strings.
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

from kvbench.reports.content import Report, Section, Table
from kvbench.reports.plots import Plot

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       margin: 0; background: #fafafa; }
main { max-width: 1280px; margin: 0 auto; padding: 1.5rem 2rem 4rem; background: #fff; }
h1 { font-size: 1.6rem; margin-top: 0; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #ddd; padding-bottom: .25rem; margin-top: 2.2rem; }
nav a { margin-right: 1rem; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: .5rem .8rem; }
.scroll { overflow-x: auto; margin: .8rem 0 1.2rem; }
table { border-collapse: collapse; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; }
th, td { border: 1px solid #e2e2e2; padding: .25rem .55rem; vertical-align: top; }
th { background: #f2f4f7; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
          max-width: 46rem; }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
details { margin: .4rem 0; }
summary { cursor: pointer; font-weight: 600; }
"""
TEXT_COLUMNS = frozenset({"output", "references"})


def write_html(report: Report, path: Path) -> Path:
    """Write `report` to `path` as a single page with no external resources."""
    nav = " ".join(f'<a href="#{_anchor(section.title)}">{escape(section.title)}</a>' for section in report.sections)
    nav += ' <a href="#per-sample-outputs">Per-sample outputs</a>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(report.title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{escape(report.title)}</h1>",
        *(f'<p class="note">{escape(note)}</p>' for note in report.notes),
        f"<nav>{nav}</nav>",
        *(_section(section) for section in report.sections),
        _samples(report),
        "</main></body></html>",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _section(section: Section) -> str:
    parts = [
        f'<section id="{_anchor(section.title)}"><h2>{escape(section.title)}</h2>',
        f"<p>{escape(section.text)}</p>",
    ]
    parts += [_table(table) for table in section.tables]
    parts += [_figure(plot) for plot in section.plots]
    return "\n".join([*parts, "</section>"])


def _table(table: Table) -> str:
    columns = list(table.frame.columns)
    classes = ["num" if name in table.numeric else "text" if name in TEXT_COLUMNS else "" for name in columns]
    header = "".join(f"<th>{escape(str(name))}</th>" for name in columns)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="{cls}">{escape(cell)}</td>' for cls, cell in zip(classes, row)) + "</tr>"
        for row in table.frame.itertuples(index=False)
    )
    caption = f"<caption>{escape(table.caption)}</caption>" if table.caption else ""
    return (
        f'<div class="scroll"><table>{caption}<thead><tr>{header}</tr></thead><tbody>\n{body}\n</tbody></table></div>'
    )


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.title)}">'
        f"<figcaption><strong>{escape(plot.title)}.</strong> {escape(plot.caption)}</figcaption></figure>"
    )


def _samples(report: Report) -> str:
    """One collapsed block per task, so a long run's outputs do not bury the tables above them."""
    parts = ['<section id="per-sample-outputs"><h2>Per-sample outputs</h2>', f"<p>{escape(report.samples_note)}</p>"]
    numeric = frozenset({"length", "sample", "budget", "score"})
    for task, group in report.samples.groupby("task", sort=False):
        parts.append(f"<details><summary>{escape(str(task))} ({len(group)} rows)</summary>")
        parts.append(_table(Table("", group.drop(columns="task"), numeric)))
        parts.append("</details>")
    return "\n".join([*parts, "</section>"])

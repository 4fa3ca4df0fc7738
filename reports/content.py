"""What a report says, independent of its format: sections of formatted tables and plots.

Both writers render this one structure, so report.md and report.html always show the same numbers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.reports import tables
from kvbench.reports.benchmarks import benchmark_tables
from kvbench.reports.intervals import LEVEL, RESAMPLES
from kvbench.reports.lengths import LengthAxis, length_axis
from kvbench.reports.plots import Plot, draw_all
from kvbench.reports.store import Run
from kvbench.reports.tables import DIFF_TO_REFERENCE, HI, LO, MEAN_OVER_TASKS, N_PAIRED, N_SCORED

MISSING = "—"
# C0 controls other than tab and newlines, which read fine as they are.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# A full RULER sweep has hundreds of thousands of rows; past this the page stops opening comfortably.
MAX_SAMPLE_ROWS = 2000
META_KEYS = (
    "model",
    "model_source",
    "dtype",
    "device",
    "attention_backend",
    "versions",
    "git_commit",
    "command",
    "seed",
    "samples",
    "tasks",
    "lengths",
    "methods",
    "budgets",
    "query_aware",
    "started_at",
    "finished_at",
)
# Display name and format of each numeric column the tables produce.
COLUMNS = {
    "budget": ("budget", "g"),
    # A budget as written: `0.25` (fraction of the full cache's bytes) or `128t` (tokens per KV head).
    "budget_label": ("budget", "s"),
    "length": ("length", "d"),
    MEAN_OVER_TASKS: (f"{MEAN_OVER_TASKS} [95% CI]", ".2f"),
    DIFF_TO_REFERENCE: (f"{DIFF_TO_REFERENCE} [95% CI]", ".2f"),
    N_SCORED: (N_SCORED, "d"),
    N_PAIRED: (N_PAIRED, "d"),
    "kv_ratio": ("KV ratio", ".3f"),
    "rows": ("rows", "d"),
    "nulls": ("nulls", "d"),
    "refused": ("refused", "d"),
    "prefill_s": ("prefill s", ".4f"),
    "compress_s": ("compress s", ".4f"),
    "decode_s": ("decode s", ".4f"),
    "decode_ms_per_token": ("decode ms/token", ".2f"),
    "kv_mib": ("KV MiB", ".2f"),
    "kv_peak_mib": ("KV peak MiB", ".2f"),
    "kv_final_mib": ("KV final MiB", ".2f"),
    "decode_tokens_per_s": ("decode tokens/s", ".1f"),
    "kv_full_mib": ("full KV MiB", ".2f"),
    "prefill_peak_mib": ("prefill peak MiB", ".1f"),
    "decode_peak_mib": ("decode peak MiB", ".1f"),
    "peak_mib": ("peak memory MiB", ".1f"),
    "skipped": ("skipped", "d"),
    "sample_tokens": ("sample tokens (median)", ".0f"),
    "length_cap": ("length cap", "d"),
    "samples": ("samples", "d"),
    "truncated": ("truncated", "d"),
    "own_median": ("sample tokens, median", ".0f"),
    "own_max": ("longest sample", "d"),
}
TEXT_COLUMNS = {"method_label": "method", "metric": "metric", "task": "task"}
INTERVAL_NOTE = (
    f"Every mean is shown as mean [lo, hi]: a {LEVEL:.0%} percentile bootstrap interval over {RESAMPLES} "
    "resamples of the sample ids (drawn within each task, the same draws for every cell of a table, fixed seed)."
)


@dataclass(frozen=True)
class Table:
    """A table with every cell already a string; `numeric` columns are right-aligned."""

    caption: str
    frame: pd.DataFrame
    numeric: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Section:
    """One heading's worth of report: a sentence on how to read it, then its tables and plots."""

    title: str
    text: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """The whole report; `samples` holds one formatted line per result row, capped at MAX_SAMPLE_ROWS."""

    title: str
    notes: list[str]
    sections: list[Section]
    samples: pd.DataFrame
    samples_note: str


def build_report(run: Run, plots_dir: Path, length_bins: tuple[float, ...] | None = None) -> Report:
    """Compute every table, draw every plot into `plots_dir`, and lay them out in reading order.

    With `length_bins` (edges in tokens), rows are grouped by the bin of their sample's own length instead of
    their length (`lengths.length_axis`). A section with nothing to show (no needle tasks, no timings in lm-eval
    rows) is left out.
    """
    rows, lengths = length_axis(run.rows, length_bins)
    plots = draw_all(rows, plots_dir, lengths)

    def _tables(captioned: list[tuple[str, pd.DataFrame]]) -> list[Table]:
        return [_format(caption, frame, lengths) for caption, frame in captioned if not frame.empty]

    sections = [
        Section(
            "Summary",
            f"One line per metric, context length (lengths are never pooled), method and budget. {MEAN_OVER_TASKS}: "
            "per-task mean scores averaged with equal weight within one metric (metrics are never averaged "
            f"together); {MISSING} where a task has no scored row; {N_SCORED}: scored samples. {DIFF_TO_REFERENCE}: "
            "the method's score minus full's, sample by sample over the samples both scored, averaged like the "
            f"mean; {N_PAIRED}: those samples. {INTERVAL_NOTE} KV ratio: mean stored KV bytes / full-cache KV "
            "bytes. nulls: empty answers. refused: cells the method declined (e.g. budget unreachable); they count "
            "here and are left out of every mean and every pair, never scored as zero. Scores are "
            "higher-is-better except perplexity, where lower is better (a positive difference there is a loss). "
            "budget: a fraction of the full cache's bytes (0.25) or tokens per KV head (128t); the two never share "
            "a line. sample tokens: data-set samples' median own length, where their length is a cap or a bin.",
            _tables([("Summary per metric, length, method and budget", tables.summary(rows))]),
        ),
        Section(
            "Scores per task",
            "Mean score per task and context length over its samples, refused cells left out; n: scored samples "
            f"over the line's tasks. {INTERVAL_NOTE} The plots show these intervals as error bars (a band for "
            "full), with each method's points nudged sideways so coinciding lines stay apart.",
            _tables(
                [
                    (f"Mean score — {tables.metric_label(metric)}", table)
                    for metric, table in tables.task_scores(rows).items()
                ]
                + [(f"Empty answers — {metric}", table) for metric, table in tables.task_nulls(rows).items()]
            ),
            _pick(plots, "score_vs_budget"),
        ),
        Section(
            "Standard benchmarks",
            "Data-set tasks in their benchmarks' own terms: LongBench's per-subset scores and their average "
            "(subsets weigh the same whatever their metric), LongBench-E's length bins, RULER's per-task scores and "
            "average per length, LongBench-v2's Overall / Easy / Hard / Short / Medium / Long, InfiniteBench's "
            f"per-task scores; x100. {DIFF_TO_REFERENCE} and n belong to the headline column (average, Overall), "
            f"paired with full sample by sample. skipped: samples over the length cap (--over-length skip), "
            f"counted, never scored. {INTERVAL_NOTE}",
            _tables(benchmark_tables(rows)),
        ),
        Section(
            "Generation quality",
            "ROUGE-1/2/L F-measures (rouge-score, stemmed) and BERTScore F1 (bert-score on the packaged "
            "all-MiniLM-L6-v2, 6 layers, not rescaled) of generated text against the references, x100; "
            "perplexity of the reference tokens scored after the compressed context, where lower is better "
            "(it is a cost, not an accuracy). Per context length, the mean over the tasks reporting each metric "
            f"(equal weight per task). {INTERVAL_NOTE}",
            _tables([("Generation quality per method and budget", tables.quality_scores(rows))]),
            _pick(plots, "quality_vs_budget"),
        ),
        Section(
            "Score vs stored KV bytes",
            "The quality a method keeps for the memory it actually used (its achieved, not requested, budget), "
            "per metric and context length, with the summary's 95% intervals as error bars.",
            plots=_pick(plots, "score_vs_kv_bytes"),
        ),
        Section(
            "Latency and memory",
            "Medians of per-row timings (seconds) per length, method and budget; decode ms/token = decode s / "
            "new tokens. KV MiB: mean stored bytes after compression; KV peak MiB: mean over rows of the most the "
            "cache held while decoding. Device peaks (prefill, decode; maximum over rows) are shown where the "
            f"device tracks them, {MISSING} for rows without one.",
            _tables([("Latency and memory", tables.latency(rows))]),
        ),
        Section(
            "Cache while generating",
            "What the cache held after each generated token (compressed context, decode state and the raw tail), "
            "mean over each method and budget's rows: a method that compresses only the context grows with the "
            "answer, a decode-time one (`decoding`, h2o/tova with decode_evict) stays bounded. Per row the store "
            "also has kv_bytes_peak, kv_bytes_final and decode_tokens_per_s (the latency table's medians).",
            plots=_pick(plots, "cache_vs_generated"),
        ),
        Section(
            "Needle depth × length",
            "Tasks whose rows carry a needle depth (needle:essays, niah_*, passkey, ...): mean score and n per "
            "depth and context length, per method and budget, refused cells left out. Depth is the first needle's "
            f"position in the context (percent); a metric with at most {tables.MAX_EXACT_DEPTHS} distinct depths "
            "(an evenly spaced grid, as needle:essays) is shown at each, more (drawn depths) in deciles.",
            [_depth_table(metric, grid, lengths) for metric, grid in tables.depth_grid(rows).items()],
            _pick(plots, "needle_depth_"),
        ),
        Section(
            "Sample lengths",
            "Data-set samples per task and length cap, each counted once: truncated: cut to the cap in the middle "
            "of the context (--over-length truncate, as LongBench); skipped: over the cap and never run "
            "(--over-length skip; refused in every table, never scored); sample tokens: their own length before "
            "any cut, generation allowance included.",
            _tables(
                [
                    (
                        "Samples, truncated and skipped per length cap",
                        tables.sample_lengths(run.rows).rename(columns={"length": "length_cap"}),
                    )
                ]
            ),
        ),
        Section("Run metadata", "From run.json.", [_metadata(run)]),
    ]
    samples = tables.sample_outputs(run.rows)  # as stored: a data-set row's length is its cap
    shown = samples.head(MAX_SAMPLE_ROWS)
    note = f"{len(samples)} rows."
    if len(shown) < len(samples):
        note = f"First {len(shown)} of {len(samples)} rows (by task, length, sample); all are in results.jsonl."
    return Report(
        title=_title(run.meta),
        notes=_notes(run, lengths),
        sections=[section for section in sections if section.tables or section.plots],
        samples=_format_samples(shown),
        samples_note=note,
    )


def _pick(plots: list[Plot], stem_prefix: str) -> list[Plot]:
    return [plot for plot in plots if plot.path.stem.startswith(stem_prefix)]


def _title(meta: dict[str, Any]) -> str:
    setting = " (query-aware)" if meta.get("query_aware") else ""
    return f"kvbench report — {meta.get('model', 'unknown model')}{setting}"


def _notes(run: Run, lengths: LengthAxis) -> list[str]:
    """Warnings a reader must see before trusting the numbers."""
    notes = [lengths.note] if lengths.note else []
    if not run.meta.get("finished_at"):
        notes.append("The run has not finished (killed or still running): cells may be missing.")
    if run.unreadable_lines:
        notes.append(f"{run.unreadable_note()}: the numbers leave them out.")
    return notes


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def _format(caption: str, frame: pd.DataFrame, lengths: LengthAxis | None = None) -> Table:
    """Numbers to strings with one precision per quantity; unknown columns (task names) are scores; `lengths`
    names the lengths (a cap, a bin)."""
    formatted = pd.DataFrame(index=frame.index)
    numeric = set()
    for column in frame.columns:
        if column == "length" and lengths is not None:
            formatted["length"] = [lengths.name(value) for value in frame[column]]
            numeric.add("length")
            continue
        name, spec = COLUMNS.get(column, (column, ".2f" if pd.api.types.is_float_dtype(frame[column]) else "d"))
        if column in TEXT_COLUMNS:
            formatted[TEXT_COLUMNS[column]] = frame[column].astype(str)
            continue
        if column == "budget" and "budget_label" in frame.columns:
            continue  # the label says it, with its unit
        if column.endswith((LO, HI)) and column[: -len(LO)] in frame.columns:
            continue
        if column + LO in frame.columns and column + HI in frame.columns:
            bounds = zip(frame[column], frame[column + LO], frame[column + HI])
            formatted[name] = [_with_interval(mean, lo, hi, spec) for mean, lo, hi in bounds]
        else:
            formatted[name] = [_cell(value, spec) for value in frame[column]]
        numeric.add(name)
    return Table(caption, formatted, frozenset(numeric))


def _depth_table(metric: str, grid: pd.DataFrame, lengths: LengthAxis) -> Table:
    """One metric's depth × length grid: a line per (method, budget, depth), a column per length, each cell
    `mean (n)`."""
    cells = [f"{_cell(score, '.1f')} ({int(n)})" for score, n in zip(grid["score"], grid["n"])]
    wide = grid.assign(cell=cells).pivot_table(
        index=["method_label", "budget_label", "depth_bin", "depth_name"],
        columns="length",
        values="cell",
        aggfunc="first",
        sort=False,
    )
    order = grid[["method_label", "budget_label", "depth_bin", "depth_name"]].drop_duplicates()
    wide = wide.reindex(pd.MultiIndex.from_frame(order)).reindex(columns=sorted(wide.columns))
    frame = pd.DataFrame(
        {
            "method": order["method_label"].astype(str).to_numpy(),
            "budget": order["budget_label"].astype(str).to_numpy(),
            "depth": order["depth_name"].astype(str).to_numpy(),
        }
    )
    for length in wide.columns:
        frame[lengths.name(length)] = wide[length].fillna(MISSING).to_numpy()
    title = f"Depth × length — {tables.metric_label(metric)}: mean score (n) per method, budget and depth"
    return Table(title, frame, frozenset(frame.columns[1:]))


def _with_interval(mean: Any, lo: Any, hi: Any, spec: str) -> str:
    """`mean [lo, hi]`, or the mean alone where no interval exists (one scored sample gives [m, m], not none)."""
    if _cell(mean, spec) == MISSING or _cell(lo, spec) == MISSING:
        return _cell(mean, spec)
    return f"{_cell(mean, spec)} [{_cell(lo, spec)}, {_cell(hi, spec)}]"


def _metadata(run: Run) -> Table:
    meta = run.meta
    keys = [key for key in META_KEYS if key in meta] + sorted(key for key in meta if key not in META_KEYS)
    items: list[tuple[str, str]] = []
    for key in keys:
        value = meta[key]
        if isinstance(value, dict):
            items.extend((f"{key}.{name}", _text(inner)) for name, inner in value.items())
        else:
            items.append((key, _text(value)))
    items.append(("result rows read", str(len(run.rows))))
    items.append(("unreadable lines skipped", str(len(run.unreadable_lines))))
    return Table("Run metadata", pd.DataFrame(items, columns=["field", "value"]))


def _text(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, list):
        return ", ".join(_text(item) for item in value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _visible(text: str) -> str:
    """Control characters (EOS remnants, NUL) as their Unicode pictures: raw, they corrupt HTML and hide in tables."""
    return _CONTROL.sub(lambda match: chr(0x2400 + ord(match.group())), text)


def _reason(error: Any) -> str:
    return error if isinstance(error, str) and error else "no score"


def _format_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """Refused cells show the method's reason in place of an answer, and no score."""
    refused = samples["refused"]
    return pd.DataFrame(
        {
            "task": samples["task"].astype(str),
            "length": [_cell(value, "d") for value in samples["length"]],
            "sample": [_cell(value, "d") for value in samples["sample_id"]],
            "method": samples["method_label"].astype(str),
            "budget": samples["budget_label"].astype(str),
            "metric": samples["metric"].astype(str),
            "score": ["refused" if no else _cell(value, ".2f") for no, value in zip(refused, samples["score"])],
            "output": [
                _visible(f"refused: {_reason(error)}" if no else (output if isinstance(output, str) else ""))
                for no, error, output in zip(refused, samples["error"], samples["output"])
            ],
            "references": [_visible(_text(refs)) if isinstance(refs, list) else "" for refs in samples["references"]],
        }
    )

"""Read one run directory's result store into pandas.

The store is the single source of truth (DESIGN §1), so reports never import the runner:
they must render a run written by any kvbench version, or one killed halfway through.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.reports.errors import ReportError

# tasks.md §11.1 post-processing, restated here because reports may import nothing but the store's
# format: an answer is empty when nothing is left after stripping and control characters.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")

REQUIRED_COLUMNS = ("task", "length", "sample_id", "method", "budget", "score", "metric")
# Later row producers (lm-eval, generation-quality tasks) may leave these out.
OPTIONAL_COLUMNS = (
    "kv_bytes",
    "kv_bytes_full",
    "kv_ratio",
    "prefill_s",
    "compress_s",
    "decode_s",
    "new_tokens",
    "output",
    "references",
    "depth",
    "peak_memory_bytes",
    "kv_bytes_peak",
    "prefill_peak_memory_bytes",
    "decode_peak_memory_bytes",
    "method_label",
    "error",
    "kv_bytes_final",
    "decode_tokens_per_s",
    "budget_tokens",
    "kv_trace",
    # data-set rows: the sample's own token count, its count before a cut to the cap, and a skip over the cap
    "sample_tokens",
    "truncated_from",
    "skipped",
)
NUMERIC_COLUMNS = (
    "length",
    "sample_id",
    "budget",
    "score",
    "kv_bytes",
    "kv_bytes_full",
    "kv_ratio",
    "prefill_s",
    "compress_s",
    "decode_s",
    "new_tokens",
    "depth",
    "peak_memory_bytes",
    "kv_bytes_peak",
    "prefill_peak_memory_bytes",
    "decode_peak_memory_bytes",
    "kv_bytes_final",
    "decode_tokens_per_s",
    "budget_tokens",
    "sample_tokens",
    "truncated_from",
)

# A note names this many line numbers at most, then how many there are in all (as the store's writer says them).
SHOWN_LINE_NUMBERS = 10


@dataclass(frozen=True)
class Run:
    """One run: its metadata, its rows, and the numbers (from 1) of the store lines that could not be read."""

    run_dir: Path
    meta: dict[str, Any]
    rows: pd.DataFrame
    unreadable_lines: tuple[int, ...]

    def unreadable_note(self, store: str = "results.jsonl") -> str | None:
        """What the report's notes and the command line say of lines that hold no row (`store` names the file): a
        reader must know that the numbers leave them out, and where to look."""
        numbers = self.unreadable_lines
        if not numbers:
            return None
        shown = ", ".join(map(str, numbers[:SHOWN_LINE_NUMBERS]))
        more = f", ... ({len(numbers)} in all)" if len(numbers) > SHOWN_LINE_NUMBERS else ""
        plural = "s" if len(numbers) > 1 else ""
        return f"{len(numbers)} unreadable line{plural} of {store} skipped (line{plural} {shown}{more})"


def load_run(run_dir: str | Path) -> Run:
    """Load `run.json` and `results.jsonl`, adding the columns every report needs.

    Added columns: `budget_label` (how the budget is written, `256t` or `0.25`: with the method label it names a
    cell, so a token budget never shares one with a fraction), `refused` (the method declined the cell, or the row has no score: either way it
    is no zero, and it stays out of every mean and every pairing), `null` (an empty answer after the
    scorer's post-processing, tasks.md §11.4). `method_label` falls back to `method` for stores
    written before rows carried it, so every report can group by it.
    """
    run_dir = Path(run_dir)
    meta = _read_meta(run_dir / "run.json")
    records, unreadable = _read_rows(run_dir / "results.jsonl")
    rows = pd.DataFrame.from_records(records)
    for name in OPTIONAL_COLUMNS:
        if name not in rows.columns:
            rows[name] = None
    for name in NUMERIC_COLUMNS:
        rows[name] = pd.to_numeric(rows[name], errors="coerce")
    rows["budget_label"] = budget_labels(rows)
    rows["method_label"] = [
        label if isinstance(label, str) and label else str(method)
        for label, method in zip(rows["method_label"], rows["method"])
    ]
    declined = rows["error"].map(lambda error: isinstance(error, str) and error != "").astype(bool)
    rows["refused"] = declined | rows["score"].isna()
    rows.loc[rows["refused"], "score"] = float("nan")
    rows["null"] = ~rows["refused"] & rows["output"].map(_is_empty).astype(bool)
    return Run(run_dir=run_dir, meta=meta, rows=rows, unreadable_lines=unreadable)


def budget_labels(rows: pd.DataFrame) -> pd.Series:
    """How each row's budget is written: `256t` for a token budget (rows with `budget_tokens`), `0.25` otherwise."""
    tokens = rows["budget_tokens"] if "budget_tokens" in rows.columns else pd.Series(None, index=rows.index)
    return pd.Series(
        [f"{int(t)}t" if pd.notna(t) else f"{float(b):g}" for t, b in zip(tokens, rows["budget"])],
        index=rows.index,
        dtype=object,
    )


def as_run(run: str | Path | Run) -> Run:
    """The run itself, or the run loaded from a directory: a caller that already holds it (the CLI, which says what
    it skipped) has the store read once."""
    return run if isinstance(run, Run) else load_run(run)


def _is_empty(output: Any) -> bool:
    """Only generated text can be empty; rows without an output (perplexity, say) are not nulls."""
    return isinstance(output, str) and not _CONTROL_CHARS.sub("", output).strip()


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReportError(f"no run.json in {path.parent}; pass a run directory written by `kvbench run`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); rerun or repair it") from None
    if not isinstance(meta, dict):
        raise ReportError(f"{path} must hold a JSON object; rerun or repair it")
    return meta


def _results_bytes(path: Path) -> bytes | None:
    """results.jsonl, or the packed results.jsonl.gz beside it (kvbench.harness.runner.store's format, restated: reports
    import nothing of the harness)."""
    if path.is_file():
        return path.read_bytes()
    packed = path.with_name(path.name + ".gz")
    return gzip.decompress(packed.read_bytes()) if packed.is_file() else None


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    """One row per line, and the numbers of the lines that hold none (a JSON object with every required column):
    a last line a killed (or running) run left half-written, or damage. Lines end at newlines only, as the store
    writes them: a row's text may hold other line separators (U+2028, NEL) unescaped."""
    data = _results_bytes(path)
    if data is None:
        raise ReportError(f"no results.jsonl in {path.parent}; the run wrote no results yet")
    records: list[dict[str, Any]] = []
    unreadable = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            record = None
        if isinstance(record, dict) and all(name in record for name in REQUIRED_COLUMNS):
            records.append(record)
        else:
            unreadable.append(number)
    if unreadable and not records:
        raise ReportError(
            f"{path} holds no readable rows, {len(unreadable)} unreadable lines; was it written by kvbench?"
        )
    if not records:
        raise ReportError(f"{path} holds no readable rows; the run wrote no results yet")
    return records, tuple(unreadable)

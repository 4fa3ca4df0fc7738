"""What a report's length axis means: the context length, the cap of a data-set run, or the user's length bins.

Generated tasks are built to their length, so a row's `length` is its sample's length. Data-set samples have
their own lengths (rows carry `sample_tokens`) and `length` is only the cap they were cut to (`--lengths`, or the
model's window): a report says so, so no reader takes 8192 for the length of a 1000-token sample. With bins
(`--length-bins 0,4k,8k,16k`) every row is placed by its own length (`sample_tokens`, else `length`) and its
`length` becomes its bin's lower edge, so every table and plot groups by the bins and still sorts by length;
the bins' names ("4k–8k") replace those numbers wherever a length is shown.

A bin holds the lengths above its lower edge up to and including its upper edge, (lo, hi], so a sample cut to a
4096-token cap lies in 0–4k; the first bin also holds its lower edge. `k` is 1024 tokens (RULER's 4k is 4096).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvbench.reports.errors import ReportError

K = 1024  # tokens in a `k`, as `kvbench.harness.cli.length_bins` parses it (restated: reports import no harness)


def edge_text(edge: float) -> str:
    """`4k` for a multiple of 1024 tokens, the number otherwise."""
    if math.isinf(edge):
        return "∞"
    edge = int(edge)
    return f"{edge // K}k" if edge and edge % K == 0 else str(edge)


def bin_names(edges: Sequence[float]) -> list[str]:
    """One name per bin: `0–4k`, ..., and `32k+` for a last bin open to infinity."""
    return [
        f"{edge_text(lo)}+" if math.isinf(hi) else f"{edge_text(lo)}–{edge_text(hi)}"
        for lo, hi in zip(edges[:-1], edges[1:])
    ]


def check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    """At least two edges, whole token counts from 0, strictly increasing; only the last may be infinite."""
    edges = tuple(float(edge) for edge in edges)
    if len(edges) < 2:
        raise ReportError("length bins need at least two edges, e.g. 0,4k,8k")
    for position, edge in enumerate(edges):
        last = position == len(edges) - 1
        if math.isnan(edge) or edge < 0 or (math.isinf(edge) and not last) or (not math.isinf(edge) and edge % 1):
            raise ReportError(f"length bin edge {edge:g} must be a whole number of tokens, 0 or more (inf: last only)")
    if any(hi <= lo for lo, hi in zip(edges, edges[1:])):
        raise ReportError(f"length bin edges {', '.join(map(edge_text, edges))} must increase")
    return edges


@dataclass(frozen=True)
class LengthAxis:
    """How each value of the rows' `length` is shown: in a table cell (`name`) and in a plot title (`title`);
    `note` says in the report's words what the lengths are."""

    names: dict[float, str] = field(default_factory=dict)
    titles: dict[float, str] = field(default_factory=dict)
    note: str | None = None

    def name(self, length: float) -> str:
        return self.names.get(float(length), f"{length:g}")

    def title(self, length: float) -> str:
        return self.titles.get(float(length), f"{length:g} tokens")


def own_lengths(rows: pd.DataFrame) -> pd.Series:
    """Each row's sample length: `sample_tokens` (data sets), else `length` (a generated task's own length)."""
    own = pd.to_numeric(rows["sample_tokens"], errors="coerce") if "sample_tokens" in rows.columns else None
    return rows["length"].astype(float) if own is None else own.fillna(rows["length"].astype(float))


def length_axis(rows: pd.DataFrame, edges: Sequence[float] | None = None) -> tuple[pd.DataFrame, LengthAxis]:
    """The rows every table and plot reads, and how their lengths are shown.

    Without `edges`: the rows as they are; a length at which data-set rows sit is named a cap. With `edges`:
    the rows in the bins, each with its bin's lower edge as `length` (its cap kept as `length_cap`); rows
    outside every bin are left out and counted in the note.
    """
    if edges is None:
        return rows, _cap_axis(rows)
    edges = check_edges(edges)
    own = own_lengths(rows).to_numpy(dtype=float)
    index = np.searchsorted(np.asarray(edges), own, side="left") - 1
    index = np.where(own == edges[0], 0, index)  # the first bin also holds its lower edge
    inside = (index >= 0) & (index < len(edges) - 1) & ~np.isnan(own)
    binned = rows[inside].assign(length_cap=rows.loc[inside, "length"], length=[float(edges[i]) for i in index[inside]])
    names = dict(zip(map(float, edges[:-1]), bin_names(edges)))
    outside = int((~inside).sum())
    note = (
        f"Lengths are bins of each sample's own token count (data sets: sample_tokens, generation allowance "
        f"included; generated tasks: their length), not the cap: {', '.join(names.values())} tokens (a bin holds "
        f"lengths above its lower edge up to its upper edge; k = {K} tokens)."
    )
    if outside:
        note += f" {outside} row{'s' if outside > 1 else ''} outside every bin left out."
    return binned, LengthAxis(names, {edge: f"{name} tokens" for edge, name in names.items()}, note)


def _cap_axis(rows: pd.DataFrame) -> LengthAxis:
    if "sample_tokens" not in rows.columns:
        return LengthAxis()
    measured = pd.to_numeric(rows["sample_tokens"], errors="coerce").notna()
    names, titles = {}, {}
    for length, has_own in measured.groupby(rows["length"].astype(float)):
        if not has_own.any():
            continue
        suffix = " (cap)" if has_own.all() else " (cap of data sets)"
        names[length] = f"{length:g}{suffix}"
        titles[length] = f"{length:g}-token cap" if has_own.all() else f"{length:g} tokens (data sets: cap)"
    if not names:
        return LengthAxis()
    note = (
        "Data-set samples have their own lengths (sample_tokens): their length here is the cap they were cut to "
        "(--lengths, or the model's window), marked (cap); the summary's sample tokens column has their median. "
        "--length-bins (e.g. 0,4k,8k,16k) groups them by their own lengths instead."
    )
    return LengthAxis(names, titles, note)

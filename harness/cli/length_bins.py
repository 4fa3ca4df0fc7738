"""`--length-bins 0,4k,8k,16k,inf`: the edges a report bins data-set samples by their own lengths (torch-free and
pandas-free, so the argument checks parse it in milliseconds; `kvbench.reports.lengths` uses the edges)."""

from __future__ import annotations

import math

from kvbench.harness.errors import KVBenchError
from kvbench.harness.runner.lists import split_list

K = 1024  # tokens in a `k`: RULER's 4k is 4096 tokens


def parse_edge(item: str) -> float:
    """`4096`, `4k` (4096 tokens) or `1.5k` (1536), or `inf` for an open last bin."""
    text = item.strip().lower()
    if text in ("inf", "infinity"):
        return math.inf
    scale = K if text.endswith("k") else 1
    try:
        value = float(text[:-1] if scale == K else text) * scale
    except ValueError:
        raise KVBenchError(f"--length-bins edge {item!r} is not a token count; write e.g. 0,4k,8k,16k") from None
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise KVBenchError(f"--length-bins edge {item!r} must be a whole number of tokens, 0 or more (k = {K})")
    return float(value)


def parse_length_bins(text: str) -> tuple[float, ...]:
    """Edges in tokens, strictly increasing, at least two; only the last may be `inf`."""
    edges = tuple(parse_edge(item) for item in split_list(text, "length-bins"))
    if len(edges) < 2:
        raise KVBenchError(f"--length-bins {text} gives {len(edges)} edge; give at least two, e.g. 0,4k,8k")
    if any(math.isinf(edge) for edge in edges[:-1]):
        raise KVBenchError(f"--length-bins {text}: only the last edge may be inf")
    for lo, hi in zip(edges, edges[1:]):
        if hi <= lo:
            raise KVBenchError(f"--length-bins {text}: edges must increase ({hi:g} follows {lo:g})")
    return edges

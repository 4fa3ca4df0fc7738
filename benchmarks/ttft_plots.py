"""The seed's three TTFT plots, drawn from `benchmarks/ttft.py`'s output file only (no measurement here).

- time_comparison.png: per context size, each (method, budget)'s time to first token from a stored context,
  stacked as load from disk, host to device (CUDA runs only), decompression and the first forward, next to
  recomputing the prefill;
- compression_ratio.png: each stored file's bytes over the `full` file's of the same size and run, against
  context size (model sizes solid, synthetic sizes dashed);
- speedup.png: prefill recompute time over TTFT from the stored context, against context size (1 = no gain).

    python benchmarks/ttft_plots.py [results/ttft/ttft.json ...] [--out results/ttft/plots]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "ttft"
STAGES = [
    ("load_disk_s", "load from disk"),
    ("h2d_s", "host to device"),
    ("decompress_s", "decompress"),
    ("forward_s", "first forward"),
]


def cell_name(row: dict[str, Any]) -> str:
    """The method's label without a checkpoint's path (the results file records it), and the budget."""
    label = re.sub(r":checkpoint=[^:]*", "", row["label"])
    return label if row["method"] == "full" else f"{label} @ {row['budget']:g}"


def measured(rows: list[dict[str, Any]], key: str, part: str | None = None) -> list[dict[str, Any]]:
    """The rows measured (status ok) with a number under `key`, of one part (model or synthetic) or both."""
    return [
        r
        for r in rows
        if r.get("status") == "ok"
        and isinstance(r.get(key), int | float)
        and not isinstance(r.get(key), bool)
        and (part is None or r["part"] == part)
    ]


def series(rows: list[dict[str, Any]], key: str, part: str | None = None) -> dict[tuple[str, str], list[tuple]]:
    """{(part, cell): [(context tokens, value), ...]} sorted by size: what a line plot draws."""
    lines: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for row in measured(rows, key, part):
        lines[(row["part"], cell_name(row))].append((row["context_tokens"], row[key]))
    return {name: sorted(points) for name, points in lines.items()}


def time_comparison(rows: list[dict[str, Any]], path: Path) -> Path:
    timed = measured(rows, "ttft_s", "model")
    sizes = sorted({r["context_tokens"] for r in timed})
    figure, axes = plt.subplots(1, max(len(sizes), 1), figsize=(5 * max(len(sizes), 1), 4.5), squeeze=False)
    for axis, size in zip(axes[0], sizes, strict=False):
        here = [r for r in timed if r["context_tokens"] == size]
        names = [cell_name(r) for r in here] + ["prefill (recompute)"]
        bottom = [0.0] * len(here)
        for key, title in STAGES:
            values = [r[key] if isinstance(r.get(key), int | float) else 0.0 for r in here]
            if any(values):
                axis.bar(range(len(here)), values, bottom=bottom, label=title)
                bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        axis.bar([len(here)], [here[0]["prefill_s"]], color="grey", label="prefill (recompute)")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_title(f"{size} context tokens")
        axis.set_ylabel("seconds (medians)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Time to first token: stored context vs recomputing the prefill")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def line_plot(lines: dict, path: Path, ylabel: str, title: str, reference: float | None = None) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (part, name), points in sorted(lines.items()):
        style = "-o" if part == "model" else "--s"
        axis.plot([p[0] for p in points], [p[1] for p in points], style, label=f"{name} ({part})")
    if reference is not None:
        axis.axhline(reference, color="grey", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context tokens")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot(results: Path | Sequence[Path], out: Path) -> list[Path]:
    """The three PNGs under `out` from one output file or several (their rows together; each row's ratios were
    taken within its own run)."""
    paths = [results] if isinstance(results, str | Path) else list(results)
    rows = [row for path in paths for row in json.loads(Path(path).read_text())["rows"]]
    out.mkdir(parents=True, exist_ok=True)
    return [
        time_comparison(rows, out / "time_comparison.png"),
        line_plot(
            series(rows, "file_bytes_vs_full"),
            out / "compression_ratio.png",
            "stored file bytes / full's",
            "Stored context size against full (same run)",
        ),
        line_plot(
            series(rows, "speedup_vs_prefill", "model"),
            out / "speedup.png",
            "prefill time / TTFT from the stored context",
            "Speedup of a stored context over recomputing the prefill",
            reference=1.0,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", default=[str(RESULTS / "ttft.json")], help="ttft.py output files")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: plots/ beside the first file)")
    args = parser.parse_args()
    results = [Path(path) for path in args.results]
    for path in results:
        if not path.is_file():
            print(f"ttft_plots: {path} is not a file; write one with 'python benchmarks/ttft.py'", file=sys.stderr)
            return 2
    try:
        paths = plot(results, Path(args.out) if args.out else results[0].parent / "plots")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        print(f"ttft_plots: {args.results} is not ttft.py output ({error.__class__.__name__})", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

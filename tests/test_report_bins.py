"""Token budgets as cells of their own, length bins over data-set samples' own lengths, and the needle's depth ×
length grid, on small stores written by hand: every expected number is worked out in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from kvbench.harness.cli.commands import main
from kvbench.harness.cli.length_bins import parse_length_bins
from kvbench.harness.errors import KVBenchError
from kvbench.reports import load_run, plots, tables
from kvbench.reports.compare import compare_markdown, paired_differences
from kvbench.reports.lengths import length_axis
from kvbench.reports.terminal import summary_text


def write_run(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"model": "tiny", "finished_at": "2026-01-01T00:00:00"}))
    (run_dir / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def row(task, sample_id, label, budget, score, length=1024, metric="exact", tokens=None, **extra) -> dict:
    kv_full = 4_000_000
    return {
        "task": task,
        "length": length,
        "sample_id": sample_id,
        "method": label.split(":")[0],
        "method_label": label,
        "budget": float(tokens) if tokens is not None else budget,
        **({"budget_tokens": tokens} if tokens is not None else {}),
        "score": score,
        "metric": metric,
        "kv_bytes": kv_full // 2,
        "kv_bytes_full": kv_full,
        "kv_ratio": 0.5,
        "output": "answer",
        "references": ["answer"],
        **({"error": "over the cap"} if score is None else {}),
        **extra,
    }


def markdown_table(markdown: str, caption: str) -> pd.DataFrame:
    lines = markdown.split(f"**{caption}**", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return pd.DataFrame(body, columns=header)


SUMMARY = "Summary per metric, length, method and budget"

# Two samples per cell. snapkv at the fraction 1 and at the token budget 1t share `budget` == 1.0 in the store:
# they are two cells, never one mean of four scores.
BUDGET_CELLS = {
    ("full", 1.0, None): [100.0, 100.0],
    ("snapkv", 1.0, None): [100.0, 0.0],  # mean 50, Δ vs full (0 - 100) / 2 = -50
    ("snapkv", None, 1): [0.0, 0.0],  # mean 0, Δ -100
    ("snapkv", None, 128): [100.0, 100.0],  # mean 100, Δ 0
    ("knorm", 0.5, None): [0.0, 100.0],
    ("knorm", None, 1): [100.0, 0.0],
}


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> Path:
    rows = [
        row("passkey", sample, label, budget, score, tokens=tokens)
        for (label, budget, tokens), scores in BUDGET_CELLS.items()
        for sample, score in enumerate(scores)
    ]
    return write_run(tmp_path_factory.mktemp("budgets"), rows)


def test_a_token_budget_is_its_own_line_labelled_in_tokens(budget_run):
    assert main(["report", str(budget_run)]) == 0
    summary = markdown_table((budget_run / "report.md").read_text(), SUMMARY)
    lines = list(zip(summary["method"], summary["budget"], summary["mean over tasks [95% CI]"], summary["n"]))
    # full first, then methods alphabetically; within a method fractions before token budgets, each ascending
    assert [(method, budget, n) for method, budget, _, n in lines] == [
        ("full", "1", "2"),
        ("knorm", "0.5", "2"),
        ("knorm", "1t", "2"),
        ("snapkv", "1", "2"),
        ("snapkv", "1t", "2"),
        ("snapkv", "128t", "2"),
    ]
    means = {(method, budget): text.split(" ")[0] for method, budget, text, _ in lines}
    assert (means[("snapkv", "1")], means[("snapkv", "1t")], means[("snapkv", "128t")]) == ("50.00", "0.00", "100.00")
    deltas = dict(zip(zip(summary["method"], summary["budget"]), summary["Δ vs full [95% CI]"]))
    assert deltas[("snapkv", "1")].startswith("-50.00") and deltas[("snapkv", "1t")].startswith("-100.00")
    samples = (budget_run / "report.md").read_text().split("## Per-sample outputs", 1)[1]
    assert "| 1t |" in samples and "| 128t |" in samples


def test_the_terminal_summary_labels_token_budgets(budget_run):
    text = summary_text(budget_run)
    snapkv = [line.split() for line in text.splitlines() if line.startswith("exact") and " snapkv " in line]
    assert [(fields[3], fields[4]) for fields in snapkv] == [("1", "50.00"), ("1t", "0.00"), ("128t", "100.00")]


def test_compare_pairs_a_token_budget_only_with_the_same_token_budget(budget_run):
    rows = load_run(budget_run).rows
    table = paired_differences(rows, "snapkv", "knorm")
    # shared labels: 1t only (snapkv's fraction 1 is no 1t, knorm's 0.5 has no partner); 0 - 100, 0 - 0 -> -50
    assert list(zip(table["budget_label"], table["second_budget_label"])) == [("1t", "1t")]
    assert table["difference"].iloc[0] == pytest.approx(-50.0)
    # full is stored at one budget: every snapkv budget is compared with it, the label says which
    against_full = paired_differences(rows, "snapkv", "full")
    assert list(against_full["budget_label"]) == ["1", "1t", "128t"]
    assert list(against_full["difference"]) == pytest.approx([-50.0, -100.0, 0.0])
    markdown = compare_markdown(budget_run, [("snapkv", "full")])
    assert "| passkey | 1t vs 1 |" in markdown and "| passkey | 128t vs 1 |" in markdown


def test_fractions_and_token_budgets_are_drawn_on_separate_axes(budget_run, monkeypatch):
    rows = load_run(budget_run).rows
    panels = plots.budget_panels(tables.task_intervals(rows), ["task", "metric", "length"])
    kinds = {tokens: sorted(zip(panel["method_label"], panel["budget_label"])) for _, tokens, panel in panels}
    assert kinds == {
        False: [("full", "1"), ("knorm", "0.5"), ("snapkv", "1")],
        True: [("full", "1"), ("knorm", "1t"), ("snapkv", "128t"), ("snapkv", "1t")],  # full: the reference line
    }
    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    plots.score_vs_budget(rows, plots.method_styles(list(rows["method_label"])), budget_run / "unused.png")
    (figure,) = drawn
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in axes] == ["budget (fraction of full KV)", "budget (tokens per KV head)"]
    assert [tick.get_text() for tick in axes[1].get_xticklabels()] == ["1t", "128t"]
    token_x = {float(x) for line in axes[1].get_lines() for x in line.get_xdata() if line.get_marker() != "None"}
    assert all(abs(x - 1) < 5 or abs(x - 128) < 5 for x in token_x)  # tokens, nudged sideways by the dodge


# Data-set rows: their length is the 8192 cap; their own lengths (sample_tokens) spread below it. One sample was
# cut to the cap from 12000 tokens, one (9000 tokens) skipped.
OWN = {0: 900, 1: 1024, 2: 3000, 3: 5000, 4: 8100}
FULL = {0: 100.0, 1: 0.0, 2: 100.0, 3: 100.0, 4: 0.0}
SNAPKV = {0: 0.0, 1: 0.0, 2: 100.0, 3: 0.0, 4: 0.0}


def dataset_rows() -> list[dict]:
    rows = []
    for label, budget, scores in (("full", 1.0, FULL), ("snapkv", 0.5, SNAPKV)):
        for sample, score in scores.items():
            extra = {"truncated_from": 12000} if sample == 4 else {}
            rows.append(row("ruler:vt", sample, label, budget, score, length=8192, sample_tokens=OWN[sample], **extra))
        rows.append(row("ruler:vt", 5, label, budget, None, length=8192, sample_tokens=9000, skipped=True))
    return rows


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("lengths"), dataset_rows())


def test_without_bins_the_cap_is_named_a_cap_and_over_length_samples_are_counted(dataset_run):
    assert main(["report", str(dataset_run)]) == 0
    markdown = (dataset_run / "report.md").read_text()
    summary = markdown_table(markdown, SUMMARY)
    assert list(summary["length"]) == ["8192 (cap)", "8192 (cap)"]
    # full scored samples 0-4: (100 + 0 + 100 + 100 + 0) / 5 = 60; the skipped sample is refused, not a zero
    assert summary["mean over tasks [95% CI]"][0].startswith("60.00") and summary["refused"][0] == "1"
    # median own length of a cell's rows: 900, 1024, 3000, 5000, 8100, 9000 -> (3000 + 5000) / 2
    assert list(summary["sample tokens (median)"]) == ["4000", "4000"]
    counted = markdown_table(markdown, "Samples, truncated and skipped per length cap")
    # six samples, each once however many cells ran it; own lengths before any cut: 900, 1024, 3000, 5000,
    # 12000, 9000 -> median 4000, longest 12000
    assert counted.to_dict("records") == [
        {
            "task": "ruler:vt",
            "length cap": "8192",
            "samples": "6",
            "truncated": "1",
            "skipped": "1",
            "sample tokens, median": "4000",
            "longest sample": "12000",
        }
    ]
    assert "their length here is the cap" in markdown.split("## Summary", 1)[0]


def test_length_bins_group_rows_by_their_samples_own_lengths(dataset_run, capsys):
    assert main(["report", str(dataset_run), "--length-bins", "0,1k,4k,8k"]) == 0
    markdown = (dataset_run / "report.md").read_text()
    summary = markdown_table(markdown, SUMMARY)
    cells = {
        (length, method): (text.split(" ")[0], n)
        for length, method, text, n in zip(
            summary["length"], summary["method"], summary["mean over tasks [95% CI]"], summary["n"]
        )
    }
    # bins (lo, hi]: 900 and 1024 (the edge) -> 0–1k; 3000 -> 1k–4k; 5000 and the 8100-token cut sample ->
    # 4k–8k; the 9000-token skipped sample is outside every bin (one row per cell: two rows left out)
    assert cells == {
        ("0–1k", "full"): ("50.00", "2"),  # 100, 0
        ("0–1k", "snapkv"): ("0.00", "2"),  # 0, 0
        ("1k–4k", "full"): ("100.00", "1"),
        ("1k–4k", "snapkv"): ("100.00", "1"),
        ("4k–8k", "full"): ("50.00", "2"),  # 100, 0
        ("4k–8k", "snapkv"): ("0.00", "2"),  # 0, 0
    }
    deltas = dict(zip(zip(summary["length"], summary["method"]), summary["Δ vs full [95% CI]"]))
    assert deltas[("4k–8k", "snapkv")].startswith("-50.00")  # (0 - 100 + 0 - 0) / 2
    notes = markdown.split("## Summary", 1)[0]
    assert "0–1k, 1k–4k, 4k–8k tokens" in notes and "2 rows outside every bin left out" in notes
    assert "| 1k–4k |" in markdown.split("## Scores per task", 1)[1].split("## ", 1)[0]
    # the per-sample table keeps the rows as stored: their length is the cap
    assert "| ruler:vt | 8192 |" in markdown.split("## Per-sample outputs", 1)[1]
    capsys.readouterr()


def test_bins_reach_the_terminal_summary_and_an_open_last_bin(dataset_run):
    text = summary_text(dataset_run, parse_length_bins("0,4k,inf"))
    lengths = [line.split()[1] for line in text.splitlines() if line.startswith("exact")]
    # 900, 1024, 3000 -> 0–4k; 5000, 8100, 9000 -> 4k+ (the skipped sample counts as refused there)
    assert lengths == ["0–4k", "0–4k", "4k+", "4k+"]
    assert "0–4k, 4k+ tokens" in text


def test_compare_names_the_cap_and_takes_the_bins(dataset_run, capsys):
    text = compare_markdown(dataset_run, [("snapkv", "full")])
    # the five scored samples: snapkv 0, 0, 100, 0, 0 against full 100, 0, 100, 100, 0 -> -40 over 5
    assert "snapkv − full: exact @ 8192-token cap (6 samples;" in text
    assert "| ruler:vt | 0.5 vs 1 | 20.0 [0.0, 60.0] | 60.0 [" in text and "| -40.0 [" in text
    assert main(["compare", str(dataset_run), "--pair", "snapkv", "full", "--length-bins", "0,4k,8k"]) == 0
    binned = capsys.readouterr().out
    # 4k–8k: samples of 5000 and 8100 tokens: snapkv 0, 0 against full 100, 0 -> -50
    block = binned.split("snapkv − full: exact @ 4k–8k tokens", 1)[1].split("\n\n", 2)[1]
    assert "| ruler:vt | 0.5 vs 1 | 0.0 [0.0, 0.0] | 50.0 [0.0, 100.0] | -50.0 [" in block
    assert "0–4k, 4k–8k tokens" in binned


def test_a_generated_task_is_binned_by_its_own_length():
    rows = pd.DataFrame(
        [row("passkey", 0, "full", 1.0, 100.0, length=1024), row("passkey", 1, "full", 1.0, 0.0, length=4096)]
    )
    binned, axis = length_axis(rows, (0, 2048, 8192))
    assert list(binned["length"]) == [0.0, 2048.0] and [axis.name(value) for value in binned["length"]] == [
        "0–2k",
        "2k–8k",
    ]


def test_length_bin_edges_parse_with_k_and_inf():
    assert parse_length_bins("0,4k,8k,inf") == (0.0, 4096.0, 8192.0, float("inf"))
    assert parse_length_bins("100,1.5k") == (100.0, 1536.0)
    for text, message in (
        ("4k", "gives 1 edge"),
        ("0,4k,4k", "edges must increase"),
        ("0,1.3k", "whole number of tokens"),
        ("0,inf,8k", "only the last edge may be inf"),
        ("0,-5", "0 or more"),
        ("0,nan", "0 or more"),
    ):
        with pytest.raises(KVBenchError, match=message):
            parse_length_bins(text)


# needle:essays rows as stores written before it recorded percent (depth as a fraction), generated needles in percent.
ESSAY_SCORES = {  # (depth, length) -> full's score; snapkv scores 0 everywhere but (0.0, 2048): 100
    (0.0, 1024): 100.0,
    (0.5, 1024): 50.0,
    (1.0, 1024): 100.0,
    (0.0, 2048): 100.0,
    (0.5, 2048): 0.0,
    (1.0, 2048): 100.0,
}


@pytest.fixture(scope="module")
def needle_run(tmp_path_factory) -> Path:
    rows = []
    for sample, ((depth, length), score) in enumerate(ESSAY_SCORES.items()):
        rows.append(row("needle:essays", sample, "full", 1.0, score, length, "needle_rougeL", depth=depth))
        other = 100.0 if (depth, length) == (0.0, 2048) else 0.0
        rows.append(row("needle:essays", sample, "snapkv", None, other, length, "needle_rougeL", 128, depth=depth))
    # a second full sample at depth 50% / 1024 scoring 0: that cell's mean is (50 + 0) / 2 = 25 over n = 2
    rows.append(row("needle:essays", 99, "full", 1.0, 0.0, 1024, "needle_rougeL", depth=0.5))
    # generated needles at twelve drawn depths (percent): binned to deciles; 5.0 and 9.9 share 0–10%
    for sample, depth in enumerate([5.0, 9.9, 15, 25, 35, 45, 55, 65, 75, 85, 95, 100]):
        rows.append(row("niah_single_1", sample, "full", 1.0, 100.0 if depth != 9.9 else 0.0, 1024, depth=depth))
    rows.append(row("chain", 0, "full", 1.0, 100.0, 1024, "chain_steps", depth=None))  # no depth: no grid
    return write_run(tmp_path_factory.mktemp("needles"), rows)


def test_the_depth_grid_has_each_cells_mean_and_n(needle_run):
    assert main(["report", str(needle_run)]) == 0
    markdown = (needle_run / "report.md").read_text()
    grid = markdown_table(markdown, "Depth × length — needle_rougeL: mean score (n) per method, budget and depth")
    assert list(grid.columns) == ["method", "budget", "depth", "1024", "2048"]
    assert grid.values.tolist() == [
        ["full", "1", "0%", "100.0 (1)", "100.0 (1)"],
        ["full", "1", "50%", "25.0 (2)", "0.0 (1)"],
        ["full", "1", "100%", "100.0 (1)", "100.0 (1)"],
        ["snapkv", "128t", "0%", "0.0 (1)", "100.0 (1)"],
        ["snapkv", "128t", "50%", "0.0 (1)", "0.0 (1)"],
        ["snapkv", "128t", "100%", "0.0 (1)", "0.0 (1)"],
    ]
    deciles = markdown_table(markdown, "Depth × length — exact: mean score (n) per method, budget and depth")
    by_depth = dict(zip(deciles["depth"], deciles["1024"]))
    # 5.0 (100) and 9.9 (0) -> 0–10%: 50 over 2; 95 and 100 -> 90–100% (100 is the last decile's top)
    assert by_depth["0–10%"] == "50.0 (2)" and by_depth["90–100%"] == "100.0 (2)" and len(by_depth) == 10
    assert "chain" not in markdown.split("## Needle depth × length", 1)[1].split("## ", 1)[0]
    assert (needle_run / "plots" / "needle_depth_needle_rougeL.png").is_file()
    assert (needle_run / "plots" / "needle_depth_exact.png").is_file()


def test_run_renders_its_report_and_summary_with_the_length_bins(tmp_path, monkeypatch, capsys):
    """`kvbench run --length-bins` hands the bins to the report and the terminal summary; the sweep itself is
    replaced by one that writes the hand-built data-set store (the sweep is not what is tested here)."""
    import kvbench.harness.runner.sweep as sweep

    model = tmp_path / "config-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))

    def fake_sweep(spec, progress=True):
        write_run(spec.out, dataset_rows())
        return type("Store", (), {"directory": spec.out, "results_path": spec.out / "results.jsonl"})()

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    out = tmp_path / "run"
    argv = ["run", "--model", str(model), "--methods", "full", "--budgets", "0.5", "--tasks", "passkey"]
    assert main([*argv, "--lengths", "1024", "--out", str(out), "--no-progress", "--length-bins", "0,4k,inf"]) == 0
    printed = capsys.readouterr().out
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("exact")] == [
        "0–4k",
        "0–4k",
        "4k+",
        "4k+",
    ]
    summary = markdown_table((out / "report.md").read_text(), SUMMARY)
    assert list(summary["length"]) == ["0–4k", "0–4k", "4k+", "4k+"]


def test_long_method_labels_wrap_after_their_separators():
    assert plots.wrap_label("decoding:base_options=window=16:interval=32 @ 128t", 24) == (
        "decoding:\nbase_options=window=16:\ninterval=32 @ 128t"
    )
    assert plots.wrap_label("full @ 1", 24) == "full @ 1"

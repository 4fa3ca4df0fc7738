"""Report intervals and comparisons (DESIGN §5), on a store built by hand so every number is known.

Where a bootstrap interval is determined by the data (its percentiles land on atoms of the exact bootstrap
distribution, whatever the draws, but for odds under 1e-3 per bound), the test states it exactly; elsewhere
it is checked against an independent bootstrap with its own draws, to a small share of the interval's width.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from kvbench.reports import intervals, load_run, plots, render_report, tables

LENGTHS = (1024, 2048)
SAMPLES = 6
TASKS = {"passkey": "passkey_exact", "niah_single_1": "string_match_all", "vt": "string_match_all"}
# (method, method_label, budget): two configurations of snapkv must be two report lines.
CELLS = [
    ("full", "full", 1.0),
    ("snapkv", "snapkv", 0.5),
    ("snapkv", "snapkv:window=32", 0.5),
    ("streaming_llm", "streaming_llm", 0.5),
]
FULL_PASSKEY_1024 = [100.0, 90.0, 80.0, 70.0, 60.0, 50.0]
HALF_RIGHT = [0.0, 0.0, 0.0, 100.0, 100.0, 100.0]
# The bootstrap mean of HALF_RIGHT is 100 k / 6 with k ~ Binomial(6, 1/2): P(k = 0) = 1.6 % < 2.5 % < P(k <= 1)
# = 10.9 %, so the 95% percentile interval is [100/6, 500/6] for any seed, but for odds of about 4e-4 per bound.
HALF_RIGHT_INTERVAL = (100 / 6, 500 / 6)
REFUSAL = "budget 0.5 is unreachable here"


def _scores(rng: random.Random, task: str, length: int, label: str) -> list[float | None]:
    """Per-sample scores: designed ones where a test states the answer, noisy ones elsewhere."""
    noisy = [round(rng.uniform(0, 100), 2) for _ in range(SAMPLES)]
    if task == "passkey" and length == 1024:
        return {
            "full": FULL_PASSKEY_1024,
            "snapkv": HALF_RIGHT,
            # Exactly 10 below full on every sample it scored; it refused the last one.
            "snapkv:window=32": [score - 10 for score in FULL_PASSKEY_1024[:-1]] + [None],
        }.get(label, noisy)
    if task == "passkey" and label == "snapkv":
        return [100.0] * SAMPLES
    if label == "snapkv":
        return [100.0] * SAMPLES if task == "niah_single_1" else HALF_RIGHT
    return noisy


def _row(task: str, length: int, sample: int, cell: tuple[str, str, float], score: float | None) -> dict:
    method, label, budget = cell
    kv_full = 1000 * length
    return {
        "task": task,
        "length": length,
        "sample_id": sample,
        "method": method,
        "method_label": label,
        "method_config": {"window": 32} if label.endswith("window=32") else {},
        "identity": {"model": "tiny", "method": {"name": method}},
        "identity_hash": f"{hash((label, budget)) & 0xFFFF:04x}",
        "budget": budget,
        "score": score,
        "metric": TASKS[task],
        "kv_bytes": int(kv_full * budget),
        "kv_bytes_full": kv_full,
        "kv_bytes_peak": int(kv_full * budget) + 4096,
        "kv_ratio": budget,
        "prefill_s": 0.5,
        "compress_s": 0.01,
        "decode_s": 0.2,
        "new_tokens": 8,
        "output": "The answer is 12345.",
        "references": ["12345"],
        "prefill_peak_memory_bytes": 300 * 2**20,
        "decode_peak_memory_bytes": 200 * 2**20,
        **({"error": REFUSAL} if score is None else {}),
    }


def write_store(run_dir: Path) -> pd.DataFrame:
    rng = random.Random(7)
    rows = [
        _row(task, length, sample, cell, score)
        for task in TASKS
        for length in LENGTHS
        for cell in CELLS
        for sample, score in enumerate(_scores(rng, task, length, cell[1]))
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"model": "tiny", "finished_at": "2025-01-01T00:00:00"}))
    (run_dir / "results.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """The run directory, the rows as written, and the summary table as numbers."""
    run_dir = tmp_path_factory.mktemp("intervals")
    rows = write_store(run_dir)
    return run_dir, rows, tables.summary(load_run(run_dir).rows)


@pytest.fixture(scope="module")
def rendered(store) -> tuple[str, str]:
    """report.md and report.html of the store, as text."""
    markdown, page = render_report(store[0])
    return markdown.read_text(), page.read_text()


def line(summary: pd.DataFrame, metric: str, length: int, label: str) -> pd.Series:
    match = summary[(summary["metric"] == metric) & (summary["length"] == length) & (summary["method_label"] == label)]
    assert len(match) == 1
    return match.iloc[0]


def independent_bootstrap(per_task: list[np.ndarray], resamples: int = 20000, seed: int = 2024) -> tuple[float, float]:
    """Percentile interval of the mean over tasks of per-task nan-means, resampling within each task:
    written apart from kvbench's (index draws and nanmean, not draw counts), with its own generator."""
    rng = np.random.default_rng(seed)
    per_task_means = []
    for values in per_task:
        drawn = values[rng.integers(0, len(values), size=(resamples, len(values)))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample that drew only unscored samples
            per_task_means.append(np.nanmean(drawn, axis=1))
    means = np.mean(per_task_means, axis=0)
    means = means[~np.isnan(means)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def scores_of(rows: pd.DataFrame, task: str, length: int, label: str) -> np.ndarray:
    cell = rows[(rows["task"] == task) & (rows["length"] == length) & (rows["method_label"] == label)]
    return cell.sort_values("sample_id")["score"].astype(float).to_numpy()


def test_interval_is_the_exact_one_where_the_data_determine_it(store):
    _, _, summary = store
    passkey = line(summary, "passkey_exact", 1024, "snapkv")
    assert passkey["mean over tasks"] == pytest.approx(50.0)
    assert (passkey["mean over tasks:lo"], passkey["mean over tasks:hi"]) == pytest.approx(HALF_RIGHT_INTERVAL)
    assert passkey["n"] == SAMPLES
    # Two tasks weighed equally and resampled within each: niah is always 100, so the mean is (100 + vt) / 2.
    both = line(summary, "string_match_all", 1024, "snapkv")
    assert both["mean over tasks"] == pytest.approx(75.0)
    expected = tuple((100 + bound) / 2 for bound in HALF_RIGHT_INTERVAL)
    assert (both["mean over tasks:lo"], both["mean over tasks:hi"]) == pytest.approx(expected)
    assert both["n"] == 2 * SAMPLES


def test_determined_interval_does_not_depend_on_the_seed():
    values = np.array(HALF_RIGHT)[:, None]
    for seed in (0, 1, 12345):
        estimate = intervals.bootstrap(values, np.zeros(SAMPLES), seed=seed)
        assert (estimate.lo[0], estimate.hi[0]) == pytest.approx(HALF_RIGHT_INTERVAL)


def test_interval_matches_an_independent_bootstrap(store):
    _, rows, summary = store
    for metric, tasks in [("passkey_exact", ["passkey"]), ("string_match_all", ["niah_single_1", "vt"])]:
        for length in LENGTHS:
            cell = line(summary, metric, length, "streaming_llm")
            per_task = [scores_of(rows, task, length, "streaming_llm") for task in tasks]
            lo, hi = independent_bootstrap(per_task)
            tolerance = 0.05 * (hi - lo)
            assert cell["mean over tasks"] == pytest.approx(np.mean([values.mean() for values in per_task]))
            assert abs(cell["mean over tasks:lo"] - lo) <= tolerance
            assert abs(cell["mean over tasks:hi"] - hi) <= tolerance


def test_lengths_are_never_pooled(store):
    _, rows, summary = store
    assert set(summary["length"]) == set(LENGTHS)
    at_1024 = line(summary, "passkey_exact", 1024, "snapkv")
    at_2048 = line(summary, "passkey_exact", 2048, "snapkv")
    assert (at_1024["mean over tasks"], at_2048["mean over tasks"]) == pytest.approx((50.0, 100.0))
    assert (at_2048["mean over tasks:lo"], at_2048["mean over tasks:hi"]) == pytest.approx((100.0, 100.0))
    per_task = tables.task_scores(load_run(store[0]).rows)["passkey_exact"]
    snapkv = per_task[per_task["method_label"] == "snapkv"]
    assert list(snapkv["length"]) == list(LENGTHS) and list(snapkv["passkey"]) == pytest.approx([50.0, 100.0])
    pooled = rows[(rows["task"] == "passkey") & (rows["method_label"] == "snapkv")]["score"].mean()
    passkey = summary[(summary["metric"] == "passkey_exact") & (summary["method_label"] == "snapkv")]
    assert pooled == pytest.approx(75.0) and not np.isclose(passkey["mean over tasks"], pooled).any()


def test_paired_n_leaves_out_the_samples_a_compared_cell_refused(store):
    _, _, summary = store
    refusing = line(summary, "passkey_exact", 1024, "snapkv:window=32")
    assert (refusing["refused"], refusing["rows"]) == (1, SAMPLES)
    assert refusing["n"] == refusing["n paired"] == SAMPLES - 1
    assert line(summary, "passkey_exact", 1024, "snapkv")["n paired"] == SAMPLES
    full = line(summary, "passkey_exact", 1024, "full")
    assert full["n"] == SAMPLES and np.isnan(full["n paired"]) and np.isnan(full["Δ vs full"])


def test_difference_to_full_is_paired_by_sample(store):
    """Each scored sample is exactly 10 below full, so the paired difference and its whole interval are −10;
    unpaired means (70 over five samples against 75 over six) would give −5 with a wide interval."""
    _, rows, summary = store
    refusing = line(summary, "passkey_exact", 1024, "snapkv:window=32")
    assert [refusing["Δ vs full"], refusing["Δ vs full:lo"], refusing["Δ vs full:hi"]] == pytest.approx([-10.0] * 3)
    full = line(summary, "passkey_exact", 1024, "full")
    assert full["mean over tasks:hi"] - full["mean over tasks:lo"] > 20
    # A noisy cell against an independent bootstrap of its per-sample differences, two tasks.
    diffs = [
        scores_of(rows, task, 2048, "streaming_llm") - scores_of(rows, task, 2048, "full")
        for task in ("niah_single_1", "vt")
    ]
    cell = line(summary, "string_match_all", 2048, "streaming_llm")
    lo, hi = independent_bootstrap(diffs)
    assert cell["Δ vs full"] == pytest.approx(np.mean([d.mean() for d in diffs]))
    assert abs(cell["Δ vs full:lo"] - lo) <= 0.05 * (hi - lo) and abs(cell["Δ vs full:hi"] - hi) <= 0.05 * (hi - lo)


def test_two_configurations_of_one_method_are_two_lines(store, monkeypatch):
    run_dir, _, summary = store
    labels = summary.loc[summary["length"] == 1024, "method_label"].tolist()
    assert labels == ["full", "snapkv", "snapkv:window=32", "streaming_llm"] * 2
    styles = plots.method_styles(labels)
    assert styles.colors["snapkv"] != styles.colors["snapkv:window=32"]
    assert styles.markers["snapkv"] != styles.markers["snapkv:window=32"]
    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    plots.score_vs_budget(load_run(run_dir).rows, styles, run_dir / "unused.png")
    (figure,) = drawn
    assert [text.get_text() for text in figure.legends[0].get_texts()] == tables.method_order(labels)
    # Both snapkv lines sit at budget 0.5 with the same passkey@2048 score (100): the dodge keeps them apart.
    panel = next(ax for ax in figure.axes if ax.get_title().startswith("passkey @ 2048"))
    points = [line for line in panel.get_lines() if line.get_marker() in plots.MARKERS]
    positions = sorted(float(x) for line in points for x in line.get_xdata())
    assert len(positions) == 3 and len(set(positions)) == 3 and all(abs(x - 0.5) < 0.05 for x in positions)


def test_markdown_and_html_show_the_intervals(rendered):
    md_text, html_text = rendered
    for text in (md_text, html_text):
        assert "mean over tasks [95% CI]" in text and "Δ vs full [95% CI]" in text and "n paired" in text
        assert "50.00 [16.67, 83.33]" in text
        assert "-10.00 [-10.00, -10.00]" in text
        assert "snapkv:window=32" in text
    summary_md = md_text.split("**Summary per metric, length, method and budget**", 1)[1].split("\n\n", 2)[1]
    header = [cell.strip() for cell in summary_md.splitlines()[0].strip("|").split("|")]
    assert header[:8] == [
        "metric", "length", "method", "budget", "mean over tasks [95% CI]", "n", "Δ vs full [95% CI]", "n paired",
    ]  # fmt: skip
    assert re.search(r"<td class=\"num\">75\.00 \[58\.33, 91\.67\]</td>", html_text)


def test_latency_table_shows_kv_peak_and_device_peaks(store, rendered):
    run_dir, _, _ = store
    table = tables.latency(load_run(run_dir).rows)
    snapkv = table[(table["length"] == 1024) & (table["method_label"] == "snapkv")].iloc[0]
    assert snapkv["kv_peak_mib"] == pytest.approx((512_000 + 4096) / 2**20)
    assert (snapkv["prefill_peak_mib"], snapkv["decode_peak_mib"]) == (300.0, 200.0)
    assert "peak_mib" not in table.columns  # no row carries the old single peak
    latency = rendered[0].split("**Latency and memory**", 1)[1].split("\n\n", 2)[1].splitlines()[0]
    assert "KV peak MiB" in latency and "prefill peak MiB" in latency and "decode peak MiB" in latency


def test_a_stratum_without_scores_leaves_the_mean_missing():
    values = np.array([[1.0, 1.0], [2.0, np.nan], [3.0, np.nan]])
    estimate = intervals.bootstrap(values, np.array(["a", "b", "b"]))
    assert estimate.mean[0] == pytest.approx((1 + 2.5) / 2) and np.isnan(estimate.mean[1]) and np.isnan(estimate.lo[1])
    assert list(estimate.n) == [3, 1]

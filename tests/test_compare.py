"""`kvbench compare`: paired differences between two configurations, on the hand-built store of
test_report_intervals, where every number is known or checked against an independent bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_report_intervals import FULL_PASSKEY_1024, SAMPLES, independent_bootstrap, scores_of, write_store

from kvbench.harness.cli.commands import main
from kvbench.reports import load_run
from kvbench.reports.compare import ALL_TASKS, compare_markdown, paired_differences


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple:
    run_dir = tmp_path_factory.mktemp("compare")
    rows = write_store(run_dir)
    return run_dir, rows, load_run(run_dir).rows


def only(table: pd.DataFrame, **where) -> dict:
    match = table
    for column, value in where.items():
        match = match[match[column] == value]
    assert len(match) == 1, where
    return match.iloc[0].to_dict()


def test_a_constant_difference_is_exact_and_a_refusal_leaves_the_pair(store):
    _, _, rows = store
    # snapkv:window=32 is 10 below full on each of the 5 samples it scored and refused the 6th; full's own scores
    # spread from 50 to 100, so only a paired difference can be exactly -10 with a zero-width interval.
    table = paired_differences(rows, "snapkv:window=32", "full")
    line = only(table, metric="passkey_exact", length=1024, task="passkey")
    assert (line["budget"], line["second_budget"]) == (0.5, 1.0)
    assert (line["difference"], line["difference:lo"], line["difference:hi"]) == pytest.approx((-10, -10, -10))
    assert line["difference:n"] == SAMPLES - 1
    assert line["first"] == pytest.approx(np.mean(FULL_PASSKEY_1024[:-1]) - 10)
    assert line["second"] == pytest.approx(np.mean(FULL_PASSKEY_1024))
    assert (line["first:n"], line["second:n"]) == (SAMPLES - 1, SAMPLES)
    assert line["second:hi"] - line["second:lo"] > 20
    # Either side may be the one stored at a single budget.
    reverse = only(paired_differences(rows, "full", "snapkv:window=32"), metric="passkey_exact", length=1024)
    assert (reverse["budget"], reverse["second_budget"]) == (1.0, 0.5)
    assert (reverse["difference"], reverse["difference:lo"], reverse["difference:hi"]) == pytest.approx((10, 10, 10))


def test_difference_over_tasks_matches_a_direct_computation_and_an_independent_bootstrap(store):
    _, written, rows = store
    table = paired_differences(rows, "snapkv", "streaming_llm")
    for length in (1024, 2048):
        per_task = {
            task: scores_of(written, task, length, "snapkv") - scores_of(written, task, length, "streaming_llm")
            for task in ("niah_single_1", "vt")
        }
        for task, differences in per_task.items():
            line = only(table, metric="string_match_all", length=length, task=task)
            assert line["difference"] == pytest.approx(differences.mean())
            assert line["budget"] == line["second_budget"] == 0.5
        pooled = only(table, metric="string_match_all", length=length, task=ALL_TASKS)
        assert pooled["difference"] == pytest.approx(np.mean([d.mean() for d in per_task.values()]))
        assert pooled["difference:n"] == 2 * SAMPLES
        lo, hi = independent_bootstrap(list(per_task.values()))
        assert abs(pooled["difference:lo"] - lo) <= 0.05 * (hi - lo)
        assert abs(pooled["difference:hi"] - hi) <= 0.05 * (hi - lo)
    # One task under a metric: no pooled line repeating it.
    assert ALL_TASKS not in set(table[table["metric"] == "passkey_exact"]["task"])


def test_metrics_and_lengths_are_never_pooled(store):
    _, _, rows = store
    table = paired_differences(rows, "snapkv", "streaming_llm")
    assert set(zip(table["metric"], table["length"])) == {
        (metric, length) for metric in ("passkey_exact", "string_match_all") for length in (1024, 2048)
    }


def test_markdown_shows_each_side_and_the_difference(store):
    run_dir, _, _ = store
    text = compare_markdown(run_dir, [("snapkv:window=32", "full")])
    assert "snapkv:window=32 − full: passkey_exact @ 1024" in text
    assert "| passkey | 0.5 vs 1 | 70.0 [" in text
    assert "| -10.0 [-10.0, -10.0] | 5 |" in text


def test_cli_says_where_the_store_is_unreadable(tmp_path, capsys):
    write_store(tmp_path)
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    lines.insert(3, "garbage\n")
    (tmp_path / "results.jsonl").write_text("".join(lines))
    assert main(["compare", str(tmp_path), "--pair", "snapkv", "streaming_llm"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"kvbench: note: 1 unreadable line of {tmp_path}/results.jsonl skipped (line 4)\n"
    assert "snapkv − streaming_llm: string_match_all @ 2048" in captured.out


def test_cli_prints_the_tables_and_refuses_unknown_labels_in_one_line(store, capsys):
    run_dir = str(store[0])
    assert main(["compare", run_dir, "--pair", "snapkv", "streaming_llm"]) == 0
    assert "snapkv − streaming_llm: string_match_all @ 2048" in capsys.readouterr().out
    assert main(["compare", run_dir, "--pair", "snapkv", "h2o"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("kvbench: error: no configuration 'h2o' in") and "\n" not in error
    assert "snapkv:window=32" in error  # it lists the labels there are
    assert main(["compare", run_dir, "--pair", "snapkv", "snapkv"]) == 2
    assert "with itself" in capsys.readouterr().err
    assert main(["compare", run_dir]) == 2
    assert "--pair" in capsys.readouterr().err

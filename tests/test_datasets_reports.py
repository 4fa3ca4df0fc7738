"""Reports in the benchmarks' own terms, on rows written by hand: the expected means are worked out in comments."""

from __future__ import annotations

import pandas as pd
import pytest

from kvbench.reports import benchmarks


def row(task, sample_id, method, score, dataset, **extra):
    label = method
    return {
        "task": task,
        "sample_id": sample_id,
        "method": method.split("@")[0],
        "method_label": method.split("@")[0],
        "budget": 1.0 if method == "full" else 0.5,
        "score": score,
        "length": 4096,
        "metric": extra.pop("metric", "longbench_qa_f1"),
        "dataset": dataset,
        "label": label,
        **extra,
    }


def test_longbench_average_weighs_subsets_equally_across_metrics():
    rows = pd.DataFrame(
        [
            # hotpotqa (qa_f1): full 100, 0 -> 50; snapkv 100, 100 -> 100
            row("longbench:hotpotqa", 0, "full", 100.0, "longbench"),
            row("longbench:hotpotqa", 1, "full", 0.0, "longbench"),
            row("longbench:hotpotqa", 0, "snapkv", 100.0, "longbench"),
            row("longbench:hotpotqa", 1, "snapkv", 100.0, "longbench"),
            # trec (classification), three samples: full 100, 100, 100 -> 100; snapkv 0, 0, 100 -> 33.33
            *(
                row("longbench:trec", i, "full", 100.0, "longbench", metric="longbench_classification")
                for i in range(3)
            ),
            *(
                row("longbench:trec", i, "snapkv", s, "longbench", metric="longbench_classification")
                for i, s in enumerate([0.0, 0.0, 100.0])
            ),
        ]
    )
    table = benchmarks.longbench(rows).set_index("method_label")
    assert table.loc["full", "hotpotqa"] == 50.0 and table.loc["full", "trec"] == 100.0
    assert table.loc["full", "average"] == pytest.approx(75.0)  # (50 + 100) / 2, not the pooled 80
    assert table.loc["snapkv", "average"] == pytest.approx((100 + 100 / 3) / 2)
    # paired with full per sample: hotpotqa diffs 0, +100 -> 50; trec -100, -100, 0 -> -66.67; average -8.33
    assert table.loc["snapkv", "Δ vs full"] == pytest.approx((50 - 200 / 3) / 2)
    assert table.loc["snapkv", "average:lo"] <= table.loc["snapkv", "average"] <= table.loc["snapkv", "average:hi"]


def test_longbench_v2_breakdown_and_skipped_counts():
    rows = pd.DataFrame(
        [
            row("longbench_v2", 0, "full", 100.0, "longbench_v2", difficulty="easy", length_class="short"),
            row("longbench_v2", 1, "full", 0.0, "longbench_v2", difficulty="hard", length_class="short"),
            row("longbench_v2", 2, "full", 100.0, "longbench_v2", difficulty="hard", length_class="long"),
            row("longbench_v2", 3, "full", None, "longbench_v2", difficulty="hard", length_class="long", skipped=True),
        ]
    )
    table = benchmarks.longbench_v2(rows).set_index("method_label")
    # scored: easy {100}, hard {0, 100}, short {100, 0}, long {100}; overall (100 + 0 + 100) / 3
    assert table.loc["full", "Overall"] == pytest.approx(200 / 3)
    assert (table.loc["full", "Easy"], table.loc["full", "Hard"]) == (100.0, 50.0)
    assert (table.loc["full", "Short"], table.loc["full", "Long"]) == (50.0, 100.0)
    assert "Medium" not in table.columns  # no medium sample
    assert table.loc["full", "skipped"] == 1


def test_longbench_e_bins_use_the_records_length():
    rows = pd.DataFrame(
        [
            row("longbench_e:hotpotqa", 0, "full", 100.0, "longbench_e", source_length=3999),
            row("longbench_e:hotpotqa", 1, "full", 0.0, "longbench_e", source_length=4000),
            row("longbench_e:hotpotqa", 2, "full", 50.0, "longbench_e", source_length=12000),
        ]
    )
    table = benchmarks.longbench_e(rows).set_index("method_label")
    assert (table.loc["full", "0-4k"], table.loc["full", "4-8k"], table.loc["full", "8k+"]) == (100.0, 0.0, 50.0)

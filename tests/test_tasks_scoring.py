"""Scorers, the Sample schema, word pools and haystack text."""

from __future__ import annotations

import json
import random

import pytest

from kvbench.tasks import METRICS, Sample, TaskError, postprocess, score
from kvbench.tasks.generated.haystacks import essay_text, essay_words, haystack_sha256, split_sentences
from kvbench.tasks.generated.words import cwe_words, niah_words, wonderwords_version
from kvbench.tasks.metrics.scoring import passkey_exact, string_match_all, string_match_part


def make_sample(metric: str, references: list[str]) -> Sample:
    return Sample("t", 0, "ctx", "q?", " A:", references, 8, metric, {"depths": [10.0]})


# --- scorers --------------------------------------------------------------------------------------


def test_postprocess_turns_control_characters_into_newlines():
    assert postprocess("  4821\x00\x1fabc\t \n") == "4821\n\nabc"
    assert postprocess("\x07\x1b  ") == ""


def test_string_match_all_is_the_fraction_of_references_found():
    refs = ["Apple-Pie", "1234567", "7654321", "zebra"]
    assert string_match_all("The numbers are 1234567 and apple-pie.", refs) == 0.5
    assert string_match_all("apple-pie 1234567 7654321 ZEBRA", refs) == 1.0
    assert string_match_all("", refs) == 0.0
    assert string_match_all("\x00 apple-pie\x1f7654321\r", refs) == 0.5


def test_string_match_part_is_one_if_any_reference_matches():
    assert string_match_part("It was Paris, France.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It was Rome.", ["paris", "Lyon"]) == 0.0


def test_passkey_exact_needs_the_whole_number():
    assert passkey_exact(" 48213. ", ["48213"]) == 1.0
    assert passkey_exact("The pass key is 48213\x03", ["48213"]) == 1.0
    assert passkey_exact("482130", ["48213"]) == 0.0
    assert passkey_exact("a48213", ["48213"]) == 0.0
    assert passkey_exact("4821", ["48213"]) == 0.0


def test_score_dispatches_on_the_sample_metric():
    from kvbench.tasks.metrics.scoring import BENCHMARK_METRICS

    # the data sets' own metrics (tests/test_datasets_metrics.py, test_math_datasets.py, test_scbench.py) come on top
    # of the generated tasks' ones
    assert set(METRICS) - set(BENCHMARK_METRICS) == {
        "string_match_all", "string_match_part", "passkey_exact", "rouge1", "rouge2", "rougeL", "bertscore_f1",
        "perplexity", "chain_steps", "chain_operations",
    }  # fmt: skip
    assert all(name.startswith(("longbench", "infbench", "needle", "math", "scbench")) for name in BENCHMARK_METRICS)
    assert score(make_sample("string_match_all", ["a1", "b2"]), "b2") == 0.5
    assert score(make_sample("string_match_part", ["a1", "b2"]), "b2") == 1.0
    assert score(make_sample("passkey_exact", ["12345"]), "123456") == 0.0
    with pytest.raises(TaskError, match="without references"):
        score(make_sample("string_match_all", []), "x")


# --- Sample ---------------------------------------------------------------------------------------


def test_sample_round_trips_through_json():
    sample = make_sample("string_match_all", ["x", "y"])
    restored = Sample.from_dict(json.loads(json.dumps(sample.to_dict())))
    assert restored == sample and restored.references == ["x", "y"]


def test_sample_rejects_unknown_metric_and_foreign_dicts():
    with pytest.raises(TaskError, match="unknown metric 'rouge'"):
        make_sample("rouge", ["x"])
    data = make_sample("string_match_all", ["x"]).to_dict()
    with pytest.raises(TaskError, match="unexpected keys \\['extra'\\]"):
        Sample.from_dict({**data, "extra": 1})
    del data["context"]
    with pytest.raises(TaskError, match="missing keys \\['context'\\]"):
        Sample.from_dict(data)


# --- word pools and haystacks ---------------------------------------------------------------------


def test_niah_words_are_sorted_unique_adjective_noun_pairs():
    words = niah_words()
    if wonderwords_version() == "3.0.1":
        assert len(words) == 6_171_620
    rng = random.Random(0)
    for index in [rng.randrange(len(words) - 1) for _ in range(20_000)] + [s - 1 for s in words._starts[1:]]:
        assert words[index] < words[index + 1]
    with pytest.raises(IndexError):
        words[len(words)]


def test_cwe_pool_is_a_seeded_permutation():
    pool = cwe_words(42)
    if wonderwords_version() == "3.0.1":
        assert len(pool) == 8166
    assert len(set(pool)) == len(pool) and "" not in pool
    assert sorted(pool) == sorted(cwe_words(7)) and pool != cwe_words(7)


def test_sentence_splitter_rules():
    text = 'He said "Hi." Then he left! "Quoted" next? 3 cats. e.g. lower case stays. Done.'
    assert split_sentences(text) == [
        'He said "Hi."',
        "Then he left!",
        '"Quoted" next?',
        "3 cats. e.g. lower case stays.",
        "Done.",
    ]
    assert split_sentences("No break here") == ["No break here"]


def test_essay_is_prose_only_and_repeats_when_short():
    words = essay_words()
    assert len(words) > 10_000 and all(word.strip() == word and word for word in words)
    assert words[:3] == ("The", '"assert"', "statement")
    assert "assert_stmt" not in words  # indented grammar and code lines are dropped
    long_text = essay_text(len(words) + 3).split(" ")
    assert long_text[-3:] == list(words[:3])
    assert len(haystack_sha256("essay")) == 64 and haystack_sha256("essay") != haystack_sha256("noise")

"""The data sets' own metrics on hand-worked examples from their official definitions (LongBench metrics.py and
eval.py, LongBench-v2 pred.py, InfiniteBench compute_scores.py): each expected value is worked out by hand in the
comment beside it."""

from __future__ import annotations

import pytest

from kvbench.tasks.metrics import infinitebench as ib
from kvbench.tasks.metrics import longbench as lb


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert lb.normalize_answer("The  U.S.A.,  an ally!") == "usa ally"
    # 'the' inside a word is kept; punctuation goes before articles are matched ("a." -> "a" -> dropped).
    assert lb.normalize_answer("Theatre of a.") == "theatre of"


def test_qa_f1_hand_worked():
    # identical after normalisation -> 1
    assert lb.longbench_qa_f1("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    # pred 'it is tower in paris' (5 tokens) vs 'paris': P=1/5, R=1, F1 = 2*(1/5)/(6/5) = 1/3
    assert lb.longbench_qa_f1("It is the tower in Paris.", ["Paris"]) == pytest.approx(1 / 3)
    # best over references
    assert lb.longbench_qa_f1("Lyon", ["Paris", "Lyon"]) == 1.0
    # repeated tokens count once per occurrence: pred 'paris paris' vs 'paris': common 1, P=1/2, R=1 -> 2/3
    assert lb.longbench_qa_f1("Paris, Paris", ["Paris"]) == pytest.approx(2 / 3)
    assert lb.longbench_qa_f1("", ["Paris"]) == 0.0


def test_first_line_rule():
    output = "\nParis\nLondon is big"
    # first line 'Paris' -> 1; the whole text 'paris london is big' (4 tokens): P=1/4, R=1 -> F1 = 0.4
    assert lb.longbench_qa_f1(output, ["Paris"], first_line=True) == 1.0
    assert lb.longbench_qa_f1(output, ["Paris"]) == pytest.approx(0.4)
    assert lb.first_line("\n\nA\nB") == "A"


def test_rouge_l_hand_worked():
    # LCS of 'the cat sat on the mat' and 'the cat is on the mat' = 'the cat on the mat' (5): P = R = 5/6
    assert lb.longbench_rouge("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert lb.longbench_rouge("", ["anything"]) == 0.0


def test_classification_hand_worked():
    classes = ["Human", "Location", "Entity"]
    # two classes named, the reference among them -> 1/2
    assert lb.longbench_classification("Human or Location", ["Human"], all_classes=classes) == 0.5
    assert lb.longbench_classification("Entity", ["Human"], all_classes=classes) == 0.0
    # 'Numeric' is a proper substring of the reference 'Numeric value' and is dropped -> 1
    numeric = ["Numeric", "Numeric value", "Human"]
    assert lb.longbench_classification("Numeric value", ["Numeric value"], all_classes=numeric) == 1.0
    # LongBench removes while iterating: after 'city' is removed, 'name' is never examined and stays -> 1/2
    quirk = ["city", "name", "city name"]
    assert lb.longbench_classification("city name", ["city name"], all_classes=quirk) == 0.5
    # first line only (trec): the second line's class does not count
    assert lb.longbench_classification("Human\nLocation", ["Human"], first_line=True, all_classes=classes) == 1.0


def test_retrieval_and_count_hand_worked():
    assert lb.longbench_retrieval("Paragraph 12", ["Paragraph 12"]) == 1.0
    assert lb.longbench_retrieval("Paragraph 3 or Paragraph 12", ["Paragraph 12"]) == 0.5  # numbers [3, 12]
    assert lb.longbench_retrieval("I do not know", ["Paragraph 12"]) == 0.0
    assert lb.longbench_count("There are 7 unique paragraphs out of 17", ["7"]) == 0.5  # numbers [7, 17]
    assert lb.longbench_count("7", ["7"]) == 1.0


def test_code_sim_hand_worked():
    # the fence line holds a backtick and is skipped; the next line equals the reference
    assert lb.longbench_code_sim("```python\nreturn x + 1\n```", ["return x + 1"]) == 1.0
    # comment line skipped; 'abc' vs 'abd': Indel distance 2 over 6 characters -> 1 - 2/6
    assert lb.longbench_code_sim("# comment\nabc", ["abd"]) == pytest.approx(4 / 6)
    assert lb.longbench_code_sim("// only comments", ["x = 1"]) == 0.0


@pytest.mark.parametrize(
    "response, letter",
    [
        ("The correct answer is (B)", "B"),
        ("The correct answer is C.", "C"),
        ("**The correct answer is (D)**", "D"),
        ("The correct answer is *A*", "A"),
        ("I think it is B", None),
        ("the correct answer is (B)", None),  # case-sensitive, as pred.py
    ],
)
def test_longbench_v2_extraction(response, letter):
    assert lb.extract_choice(response) == letter
    assert lb.longbench_v2_choice(response, ["B"]) == float(letter == "B")


def test_longbench_e_bins():
    assert [lb.longbench_e_bin(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == [
        "0-4k",
        "0-4k",
        "4-8k",
        "4-8k",
        "8k+",
        "8k+",
    ]


def test_infinitebench_retrieval_family():
    assert ib.infbench_first_int("The pass key is 71432. Remember it.", ["71432"]) == 1.0
    assert ib.infbench_first_int("The pass key is 7143 2", ["71432"]) == 0.0  # first digit run is 7143
    assert ib.infbench_kv_retrieval('The value is "a1b2-c3".', ["a1b2-c3"]) == 1.0
    assert ib.infbench_kv_retrieval("The value is a1b2-c3x", ["a1b2-c3"]) == 0.0
    assert ib.infbench_dialogue("John.", ["JOHN"]) == 1.0
    assert ib.infbench_dialogue("Johnny", ["JOHN"]) == 0.0


def test_infinitebench_choice_and_code():
    refs = ["The butler", "B"]
    assert ib.infbench_choice("B. The butler", refs) == 1.0  # first character
    assert ib.infbench_choice("The answer is B", refs) == 1.0  # after 'answer is'
    assert ib.infbench_choice("I think the answer is: C", refs) == 0.0
    assert ib.infbench_choice("so, maybe B then", refs) == 1.0  # first whole-word letter
    assert ib.infbench_code_debug("C.", ["func_a", "C"]) == 1.0
    assert ib.infbench_code_debug("The answer is: func_a", ["func_a", "C"]) == 1.0
    assert ib.infbench_code_debug("The answer is: B", ["func_a", "C"]) == 0.0
    assert ib.infbench_code_run("The value is 42.", ["42"]) == 1.0
    assert ib.infbench_code_run("42 is not it: 41", ["42"]) == 0.0


def test_infinitebench_math_and_text():
    assert ib.infbench_math_calc("[1, 4, 9, 8]", ["1", "4", "8"]) == pytest.approx(2 / 3)  # stops at 9
    assert ib.infbench_math_find("The answer is 17 and 3", ["17"]) == 1.0
    assert ib.infbench_math_find("about 2.5", ["2.5"]) == 1.0
    assert ib.infbench_qa_f1("The Eiffel Tower", ["eiffel tower"]) == 1.0
    assert ib.infbench_rouge_lsum("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)


def test_registry_passes_metric_options():
    from kvbench.tasks import Sample
    from kvbench.tasks.registry import score

    sample = Sample(
        "longbench:trec",
        0,
        "ctx",
        "q",
        "",
        ["Human"],
        64,
        "longbench_classification",
        {"metric_options": {"first_line": True, "all_classes": ["Human", "Location"]}},
    )
    assert score(sample, "Human\nLocation") == 1.0
    assert score(sample, "Human or Location") == 0.5

"""AIME25 and MATH500: `math_boxed` on hand-worked answers (the last `\\boxed{}`, MATH's normalisation, math-verify's
equivalence), the prompts built from both schemas (the hub's `problem, answer` and kvpress's rows) against the
layout written out by hand, the generation allowance under a length cap, a run end to end on a tiny model over a
fixture in each schema, a missing data set refused in one line before the model loads, `kvbench list tasks`, and
`kvbench data fetch` writing the copy the loader reads (its download faked: no network)."""

from __future__ import annotations

import json

import pytest
from dataset_fixtures import isolate_caches, missing_data_set_line, write_jsonl

from kvbench.harness.cli.commands import main
from kvbench.tasks.errors import TaskError
from kvbench.tasks.metrics.math_answer import last_boxed, math_boxed, normalize

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# -- the metric ------------------------------------------------------------------------------------------------


def test_a_fraction_equals_its_decimal():
    # 1/2 = 0.5: different strings, equal numbers (math-verify's numeric comparison decides)
    assert normalize(r"\frac{1}{2}") != normalize("0.5")
    assert math_boxed(r"So the probability is $\boxed{\frac{1}{2}}$.", ["0.5"]) == 1.0
    assert math_boxed(r"$\boxed{0.5}$", [r"\frac{1}{2}"]) == 1.0
    assert math_boxed(r"$\boxed{\frac{1}{3}}$", ["0.5"]) == 0.0  # 0.333... is not 0.5


def test_integers():
    assert math_boxed(r"The answer is \boxed{3}.", ["3"]) == 1.0
    assert math_boxed(r"The answer is \boxed{4}.", ["3"]) == 0.0
    # AIME answers are 000-999: a zero-padded integer is the same integer, a different digit string is not
    assert math_boxed(r"\boxed{033}", ["33"]) == 1.0
    assert math_boxed(r"\boxed{330}", ["33"]) == 0.0
    assert math_boxed(r"\boxed{1,000}", ["1000"]) == 1.0  # thousands separators


def test_the_last_box_is_the_answer():
    text = r"First $\boxed{2}$ for the subproblem; finally the total is $\boxed{3}$."
    assert last_boxed(text) == "3"
    assert math_boxed(text, ["3"]) == 1.0
    assert math_boxed(text, ["2"]) == 0.0  # an earlier box does not count
    # \boxed wins over \fbox wherever they are (MATH's last_boxed_only_string looks for \fbox only without \boxed)
    assert last_boxed(r"\boxed{1} then \fbox{2}") == "1"
    assert last_boxed(r"only \fbox{2}") == "2"


def test_nested_braces_are_balanced():
    text = r"Hence $x = \boxed{\sqrt{2}+\frac{1}{2}}$."
    assert last_boxed(text) == r"\sqrt{2}+\frac{1}{2}"  # not cut at the first closing brace
    assert math_boxed(text, [r"\frac{1}{2}+\sqrt{2}"]) == 1.0  # the same sum in the other order
    assert math_boxed(text, [r"\sqrt{2}-\frac{1}{2}"]) == 0.0


def test_no_box_scores_zero():
    assert last_boxed("The answer is 3.") is None
    assert math_boxed("The answer is 3.", ["3"]) == 0.0  # right number, but not boxed
    assert math_boxed(r"\boxed{}", ["3"]) == 0.0  # an empty box
    assert math_boxed(r"so the answer is \boxed{\frac{1}{2", ["1/2"]) == 0.0  # cut off inside the box
    assert math_boxed(r"\boxed{3} and then \boxed{\frac{1", ["3"]) == 0.0  # the last box is the unclosed one


def test_boxed_without_braces():
    # `\boxed 5` (lm-eval's minerva-math form): up to the next $ or line end
    assert last_boxed(r"so $\boxed 5$ is it") == "5"
    assert math_boxed("so $\\boxed 5$\nand more", ["5"]) == 1.0


def test_an_assignment_answers_its_value():
    # decided as MATH's _strip_string: a left side of at most two characters before one `=` is dropped
    assert normalize("x = 5") == "5"
    assert math_boxed(r"\boxed{x=5}", ["5"]) == 1.0
    assert math_boxed(r"\boxed{k = 5}", ["5"]) == 1.0
    assert math_boxed(r"\boxed{x=6}", ["5"]) == 0.0


def test_text_answers():
    # MATH500 has answers such as \text{Evelyn} and \text{(C)}: the wrapper goes, the text must match
    assert math_boxed(r"\boxed{\text{Evelyn}}", [r"\text{Evelyn}"]) == 1.0
    assert math_boxed(r"\boxed{Evelyn}", [r"\text{Evelyn}"]) == 1.0
    assert math_boxed(r"\boxed{\text{(C)}}", [r"\text{(C)}"]) == 1.0
    assert math_boxed(r"\boxed{\text{Bob}}", [r"\text{Evelyn}"]) == 0.0
    assert math_boxed(r"\boxed{\text{(B)}}", [r"\text{(C)}"]) == 0.0


def test_normalisation_hand_worked():
    # MATH's _strip_string steps, one by one: \left/\right and spaces go, \dfrac -> \frac, \frac12 braced
    assert normalize(r"\left( 3, \dfrac12 \right)") == r"(3,\frac{1}{2})"
    assert normalize(r"90^\circ") == "90"
    assert normalize(r"5\text{ cm}") == "5"  # a unit on the right
    assert normalize(r"\$18.90") == "18.90"
    assert normalize(r"\sqrt3") == r"\sqrt{3}"
    assert normalize("3/4") == r"\frac{3}{4}"
    assert normalize(".5") == "0.5"
    assert normalize("10\\%") == "10"
    assert math_boxed(r"\boxed{\dfrac{3}{4}}", [r"\frac34"]) == 1.0


def test_off_the_main_thread():
    # math-verify's timeouts use signal.alarm, which only the main thread may set: elsewhere they are off
    import threading

    from kvbench.tasks.metrics import math_answer

    math_answer._check_math_verify.cache_clear()  # its own check runs in the thread too
    scores = []
    worker = threading.Thread(target=lambda: scores.append(math_boxed(r"\boxed{\frac{1}{2}}", ["0.5"])))
    worker.start()
    worker.join()
    assert scores == [1.0]


def test_a_math_verify_that_parses_nothing_is_an_error(monkeypatch):
    # without a working ANTLR runtime math-verify's parse returns nothing and only logs it: every equivalence would
    # silently score 0, so the first comparison refuses instead
    import math_verify

    from kvbench.tasks.metrics import math_answer

    math_answer._check_math_verify.cache_clear()
    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: [])
    with pytest.raises(TaskError, match="math-verify cannot parse LaTeX"):
        math_boxed(r"\boxed{\frac{1}{2}}", ["0.5"])
    assert math_boxed(r"\boxed{3}", ["3"]) == 1.0  # a normalised string match needs no math-verify
    monkeypatch.undo()
    math_answer._check_math_verify.cache_clear()
    assert math_boxed(r"\boxed{\frac{1}{2}}", ["0.5"]) == 1.0


def test_any_reference_counts():
    assert math_boxed(r"\boxed{7}", ["6", "7"]) == 1.0
    with pytest.raises(TaskError):
        math_boxed(r"\boxed{7}", [])


# -- prompts from both schemas --------------------------------------------------------------------------------

AIME = [
    {"problem": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b$.", "answer": "70",
     "id": "0"},
    {"problem": "How many ordered pairs $(x,y)$ of integers satisfy $12x^2-xy-6y^2=0$?", "answer": "117", "id": "1"},
]  # fmt: skip
MATH500_KVPRESS = [
    {"context": " ", "question": "What is $1+1$?", "answer_prefix": "", "answer": "2", "max_new_tokens": 4096,
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"context": " ", "question": "Simplify $\\frac{2}{4}$.", "answer_prefix": "", "answer": "\\frac{1}{2}",
     "max_new_tokens": 4096, "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/2.json"},
]  # fmt: skip


def test_hub_schema_prompt_and_allowance():
    from kvbench.tasks.datasets.catalog import records_to_samples

    first, second = records_to_samples("aime25", AIME, "fixture")
    # kvpress's layout: the context is one space, the question the problem and the boxed-answer instruction
    assert first.context == " "
    assert first.question == AIME[0]["problem"] + "\n" + INSTRUCTION
    assert (first.answer_prefix, first.references, first.metric) == ("", ["70"], "math_boxed")
    assert first.max_new_tokens == 32000  # kvpress's AIME25 allowance
    assert first.metadata["source_id"] == "0"
    # one problem, one unit: the shared one-space context does not group them
    assert (first.metadata["context_id"], second.metadata["context_id"]) == (0, 1)
    (math,) = records_to_samples(
        "math500", [{"problem": "What is $1+1$?", "answer": "2", "subject": "Prealgebra", "level": 1}], "fixture"
    )
    assert math.max_new_tokens == 4096 and (math.metadata["subject"], math.metadata["level"]) == ("Prealgebra", 1)


def test_kvpress_schema_rows():
    from kvbench.tasks.datasets.catalog import records_to_samples

    rows = [{**MATH500_KVPRESS[0], "max_new_tokens": 512, "answer_prefix": "Answer: "}, MATH500_KVPRESS[1]]
    first, second = records_to_samples("math500", rows, "fixture")
    assert (first.context, first.question) == (" ", "What is $1+1$?\n" + INSTRUCTION)
    assert (first.max_new_tokens, first.answer_prefix) == (512, "Answer: ")  # the row's own values win
    assert first.metadata["source_id"] == "test/prealgebra/1.json"
    # a question that already asks for a boxed answer gets no second instruction
    (asked,) = records_to_samples("aime25", [{**rows[0], "question": "Box it: \\boxed{}. What is 2+2?"}], "f")
    assert asked.question == "Box it: \\boxed{}. What is 2+2?"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"answer": "1"}, "neither 'problem'"),
        ({"problem": "p"}, "no field 'answer'"),
        ({"context": " ", "question": "q", "answer": "1", "max_new_tokens": 0}, "positive integer"),
    ],
)
def test_bad_records_are_one_line(record, message):
    from kvbench.tasks.datasets.catalog import records_to_samples

    with pytest.raises(TaskError, match=message) as error:
        records_to_samples("aime25", [record], "fixture")
    assert "\n" not in str(error.value)


def test_a_length_cap_shrinks_the_allowance_not_the_problem(tasks_chat_tokenizer):
    from kvbench.tasks.datasets.catalog import records_to_samples
    from kvbench.tasks.datasets.lengths import fit_samples
    from kvbench.tasks.prompting import split_prompt

    (sample,) = records_to_samples("aime25", AIME[:1], "fixture")
    parts = split_prompt(tasks_chat_tokenizer, sample.context, sample.question, sample.answer_prefix)
    prompt = len(parts.context_ids) + len(parts.question_ids)  # the problem as run, counted directly
    (fitted,) = fit_samples([sample], tasks_chat_tokenizer, prompt + 50)
    assert fitted.max_new_tokens == 50 and fitted.question == sample.question
    assert fitted.metadata["max_new_tokens_from"] == 32000 and fitted.metadata["sample_tokens"] == prompt + 50
    (skipped,) = fit_samples([sample], tasks_chat_tokenizer, prompt + 50, over_length="skip")
    assert "skipped" in skipped.metadata and skipped.max_new_tokens == 32000
    (no_room,) = fit_samples([sample], tasks_chat_tokenizer, prompt)
    assert "leaves no room to generate" in no_room.metadata["skipped"]
    (fits,) = fit_samples([sample], tasks_chat_tokenizer, prompt + 32000)
    assert fits.max_new_tokens == 32000 and "max_new_tokens_from" not in fits.metadata


# -- through the command line ---------------------------------------------------------------------------------


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    return isolate_caches(tmp_path, monkeypatch)


def test_both_schemas_run_end_to_end(chat_model_dir, tmp_path, isolated_caches):
    data = tmp_path / "data"
    write_jsonl(data / "aime25" / "aime25.jsonl", AIME)  # the hub schema
    write_jsonl(data / "math500" / "math500.jsonl", [{**r, "max_new_tokens": 24} for r in MATH500_KVPRESS])
    out = tmp_path / "run"
    argv = [
        "run", "--model", chat_model_dir, "--methods", "full,decoding:base=knorm:interval=8", "--budgets", "32t",
        "--tasks", "aime25,math500", "--lengths", "120", "--samples", "1", "--out", str(out), "--no-progress",
        "--no-report", "--batch-size", "2", "--data", f"aime25={data / 'aime25'}", "--data",
        f"math500={data / 'math500'}",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # 2 tasks x 1 problem x (full, decoding@32t)
    for row in rows:
        assert "error" not in row and row["metric"] == "math_boxed"
        assert row["score"] in (0.0, 100.0)
        if "\\boxed" not in row["output"]:
            assert row["score"] == 0.0  # a random tiny model boxes nothing: no box, no credit
        assert row["sample_tokens"] <= 120 and row["context_tokens"] + row["question_tokens"] < 120
    aime = [row for row in rows if row["task"] == "aime25"]
    assert {row["references"][0] for row in aime} == {"70"}
    # 32000 tokens do not fit under 120: the allowance is what the cap leaves after the problem
    assert all(row["max_new_tokens_from"] == 32000 and row["sample_tokens"] == 120 for row in aime)
    for row in aime:
        assert row["new_tokens"] <= 120 - row["context_tokens"] - row["question_tokens"]
    math = [row for row in rows if row["task"] == "math500"]
    assert all("max_new_tokens_from" not in row and row["new_tokens"] <= 24 for row in math)  # the rows' own 24
    # the long answer is where the cache grows: the wrapped scorer holds it at its budget, full does not
    peak = {(row["task"], row["sample_id"], row["budget"]): row["kv_bytes_peak"] for row in rows}
    for (task, sample_id, budget), held in peak.items():
        if budget == 32.0:
            assert held < peak[(task, sample_id, 1.0)]


def test_missing_data_set_is_one_line_before_the_model_loads(chat_model_dir, tmp_path, capsys, monkeypatch,
                                                             isolated_caches):  # fmt: skip
    err = missing_data_set_line(chat_model_dir, "aime25", tmp_path, capsys, monkeypatch)
    assert "data set aime25 not found" in err and "aime25/aime25.jsonl" in err
    assert "math-ai/aime25" in err and "alessiodevoto/aime25" in err  # the hub copy, then kvpress's
    assert "kvbench data fetch aime25" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "aime25:x"], "aime25 takes no subset"),
        (["--tasks", "math500", "--data", "math500=/no/such/file"], "no such file or directory"),
    ],
)
def test_argument_errors_are_one_line(tmp_path, capsys, args, message):
    argv = ["run", "--model", "smollm2-135m", "--methods", "full", "--budgets", "1", "--out", str(tmp_path / "o")]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_list_tasks_shows_presence(tmp_path, capsys, isolated_caches):
    write_jsonl(isolated_caches / "math500" / "math500.jsonl", MATH500_KVPRESS)  # kvbench's own copy
    assert main(["list", "tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    aime = next(line for line in lines if line.startswith("aime25 "))
    math = next(line for line in lines if line.startswith("math500 "))
    assert "absent" in aime
    assert "present" in math and str(isolated_caches / "math500" / "math500.jsonl") in math


def test_fetch_writes_the_copy_the_loader_reads(isolated_caches, monkeypatch, capsys, tasks_chat_tokenizer):
    import datasets

    from kvbench.tasks.datasets import catalog
    from kvbench.tasks.datasets.lengths import dataset_samples

    hub = {
        ("math-ai/aime25", None, "test"): AIME,
        ("HuggingFaceH4/MATH-500", None, "test"): [
            {"problem": "What is $1+1$?", "solution": "$1+1=\\boxed{2}$", "answer": "2", "subject": "Prealgebra",
             "level": 1, "unique_id": "test/prealgebra/1.json"},
        ],
    }  # fmt: skip
    asked = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        return hub[(path, name, split)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert main(["data", "fetch", "aime25,math500"]) == 0
    assert asked == list(hub)
    out = capsys.readouterr().out
    assert f"aime25: 2 records -> {isolated_caches / 'aime25' / 'aime25.jsonl'}" in out
    written = [json.loads(line) for line in (isolated_caches / "aime25" / "aime25.jsonl").read_text().splitlines()]
    assert written == AIME
    monkeypatch.setattr(catalog, "_hub_rows", lambda *a: None)  # the run must not need the hub
    located, _ = catalog.locate("math500", {})
    assert located is not None and located.path == isolated_caches / "math500" / "math500.jsonl"
    (sample,) = dataset_samples("math500", tasks_chat_tokenizer, None, 5, {})
    assert sample.question == "What is $1+1$?\n" + INSTRUCTION and sample.references == ["2"]

"""Loaders for a user's own files: RULER, LongBench and kvpress JSONL, and HF datasets."""

from __future__ import annotations

import json
import sys

import pytest

from kvbench.tasks import TaskError, generate_samples, load_hf_samples, load_jsonl_samples
from kvbench.tasks.datasets.loaders import split_ruler_input

QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def kvbench_samples(tasks_chat_tokenizer):
    """One generated sample per family, used as RULER-formatted input."""
    return {task: generate_samples(task, tasks_chat_tokenizer, 1024, 1)[0] for task in ("vt", "cwe", "niah_multivalue")}


def test_ruler_jsonl_split_recovers_each_part(tmp_path, kvbench_samples):
    records = [
        {"index": 7 + i, "input": s.context + s.question + s.answer_prefix, "outputs": s.references, "length": 1000}
        for i, s in enumerate(kvbench_samples.values())
    ]
    loaded = load_jsonl_samples(write_jsonl(tmp_path / "ruler.jsonl", records), format="ruler")
    for original, sample in zip(kvbench_samples.values(), loaded):
        assert (sample.context, sample.question, sample.answer_prefix) == (
            original.context,
            original.question,
            original.answer_prefix,
        )
        assert sample.references == original.references and sample.metric == "string_match_all"
    assert [s.task for s in loaded] == ["vt", "cwe", "niah"]
    assert [s.max_new_tokens for s in loaded] == [30, 120, 128]
    assert [s.sample_id for s in loaded] == [7, 8, 9]
    assert loaded[0].metadata == {"source": str(tmp_path / "ruler.jsonl"), "format": "ruler", "source_length": 1000}


def test_vt_few_shot_repeats_the_question_and_the_last_match_wins():
    shot = "VAR AB = 1\nQuestion: Find all variables that are assigned the value 1 in the text above. Answer: AB\n"
    main = "VAR CD = 2\n"
    question = "Question: Find all variables that are assigned the value 2 in the text above."
    family, context, found_question, answer_prefix = split_ruler_input(shot + main + question + " Answer: They are")
    assert (family, context, found_question, answer_prefix) == ("vt", shot + main, question, " Answer: They are")


def test_ruler_qa_record_with_separate_answer_prefix(tmp_path):
    text = f"{QA_INSTRUCTION}\n\nDocument 1: Paris is in France.\n\n{QA_INSTRUCTION}\n\nQuestion: Where is Paris?"
    path = write_jsonl(tmp_path / "qa.jsonl", [{"input": text, "outputs": ["France"], "answer_prefix": " Answer:"}])
    (sample,) = load_jsonl_samples(path, task="qa_1")
    assert sample.context == f"{QA_INSTRUCTION}\n\nDocument 1: Paris is in France.\n\n"
    assert sample.question == f"{QA_INSTRUCTION}\n\nQuestion: Where is Paris?"
    assert sample.answer_prefix == " Answer:"
    assert (sample.task, sample.metric, sample.max_new_tokens) == ("qa_1", "string_match_part", 32)


def test_longbench_jsonl_uses_document_as_context_and_input_as_question(tmp_path):
    record = {
        "input": "Who wrote it?",
        "context": "Alice wrote the report.",
        "answers": ["Alice"],
        "length": 4,
        "dataset": "hotpotqa",
        "_id": "ab12",
    }
    (sample,) = load_jsonl_samples(write_jsonl(tmp_path / "lb.jsonl", [record]), format="longbench")
    assert (sample.context, sample.question, sample.answer_prefix) == ("Alice wrote the report.", "Who wrote it?", "")
    assert (sample.task, sample.references, sample.max_new_tokens) == ("hotpotqa", ["Alice"], 32)
    assert sample.metric == "string_match_part" and sample.metadata["_id"] == "ab12"

    unknown = write_jsonl(tmp_path / "own.jsonl", [{**record, "dataset": "mine"}])
    with pytest.raises(TaskError, match="pass max_new_tokens"):
        load_jsonl_samples(unknown, format="longbench")
    (own,) = load_jsonl_samples(unknown, format="longbench", max_new_tokens=12, metric="string_match_all")
    assert (own.max_new_tokens, own.metric) == (12, "string_match_all")


def test_kvpress_rows_are_taken_as_split(tmp_path):
    row = {
        "context": "C",
        "question": "Q",
        "answer_prefix": " A",
        "answer": ["x"],
        "task": "niah_single_1",
        "max_new_tokens": 64,
    }
    (sample,) = load_jsonl_samples(write_jsonl(tmp_path / "kv.jsonl", [row]), format="kvpress")
    assert (sample.context, sample.question, sample.answer_prefix, sample.references) == ("C", "Q", " A", ["x"])
    assert (sample.task, sample.max_new_tokens, sample.metric) == ("niah_single_1", 64, "string_match_all")


def test_loader_errors_are_one_line_task_errors(tmp_path):
    good = {"input": "What is the special magic x", "outputs": ["1"]}
    with pytest.raises(TaskError, match="record 1 has no field 'input'"):
        load_jsonl_samples(write_jsonl(tmp_path / "a.jsonl", [good, {"outputs": []}]))
    with pytest.raises(TaskError, match="record 0: field 'input' must be a string"):
        load_jsonl_samples(write_jsonl(tmp_path / "a.jsonl", [{"input": 1, "outputs": []}]))
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps(good) + "\nnot json\n")
    with pytest.raises(TaskError, match="b.jsonl:2: not valid JSON"):
        load_jsonl_samples(bad)
    with pytest.raises(TaskError, match="no RULER question pattern"):
        load_jsonl_samples(write_jsonl(tmp_path / "c.jsonl", [{"input": "nothing to ask", "outputs": ["1"]}]))
    with pytest.raises(TaskError, match="unknown data format 'csv'"):
        load_jsonl_samples(tmp_path / "c.jsonl", format="csv")
    with pytest.raises(TaskError, match="no such file"):
        load_jsonl_samples(tmp_path / "missing.jsonl")


def test_hf_loader_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TaskError, match="pip install datasets"):
        load_hf_samples("simonjegou/ruler", "4096")

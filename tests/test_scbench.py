"""SCBench's shared contexts: the per-turn scores on hand-worked examples from compute_scores.py's definitions, the
prompts built from a row against the official templates written out by hand, one row per turn with the context's
id and the turn number, a fixture in the official schema (`id, context, multi_turns: [{input, answer}]`) run end to
end with the context compressed once per cell (and, marked slow, each turn equal to a run of that turn alone), and a
missing data set refused in one line before the model loads."""

from __future__ import annotations

import json

import pytest
from dataset_fixtures import isolate_caches, missing_data_set_line, snapkv_compressions, write_jsonl

from kvbench.harness.cli.commands import main
from kvbench.tasks.errors import TaskError
from kvbench.tasks.metrics.scbench import scbench_qa, scbench_retrieval

KV_CONTEXT = json.dumps({f"key-{i}": f"value-{i}" for i in range(12)})
BOOK = "The Eiffel Tower is a wrought-iron lattice tower in Paris, designed by the company of Gustave Eiffel. " * 4


def test_retrieval_is_a_verbatim_substring():
    assert scbench_retrieval('The value is "9f1c-22ab".', ["9f1c-22ab"]) == 1.0
    assert scbench_retrieval("9F1C-22AB", ["9f1c-22ab"]) == 0.0  # case-sensitive: `label in pred`
    assert scbench_retrieval("9f1c 22ab", ["9f1c-22ab"]) == 0.0
    assert scbench_retrieval("prefix9f1c-22absuffix", ["9f1c-22ab"]) == 1.0  # no word split
    with pytest.raises(TaskError):
        scbench_retrieval("x", [])


def test_qa_is_an_upper_cased_substring():
    assert scbench_qa("  it was gustave eiffel.  ", ["Gustave Eiffel"]) == 1.0  # both upper-cased
    assert scbench_qa("Lyon", ["Paris", "Lyon"]) == 1.0  # any reference
    assert scbench_qa("Eiffel", ["Gustave Eiffel"]) == 0.0  # the reference must be inside the prediction
    assert scbench_qa("", ["Paris"]) == 0.0


def kv_row(row_id, keys):
    return {
        "id": row_id,
        "context": KV_CONTEXT,
        "multi_turns": [
            {"input": f'Key: "key-{k}"\nThe value associated with the specified key is: ', "answer": f"value-{k}"}
            for k in keys
        ],
    }


def test_one_sample_per_turn_with_the_official_templates():
    from kvbench.tasks.datasets.catalog import records_to_samples

    samples = records_to_samples("scbench:kv", [kv_row(7, [3, 5]), kv_row(8, [1])], "fixture")
    assert [(s.sample_id, s.metadata["turn"], s.metadata["context_id"]) for s in samples] == [
        (0, 0, 0),
        (1, 1, 0),
        (2, 0, 0),  # the same context text in two rows: one context
    ]
    assert [s.metadata["source_id"] for s in samples] == [7, 7, 8]
    first = samples[0]
    # eval_utils.py's scbench_kv template "...below.\n\n{context}\n\n{input}", cut after the context
    assert first.context == "Extract the value corresponding to the specified key in the JSON object below.\n\n" + (
        KV_CONTEXT
    )
    assert first.question == '\n\nKey: "key-3"\nThe value associated with the specified key is: '
    assert (first.references, first.max_new_tokens, first.metric) == (["value-3"], 150, "scbench_retrieval")
    qa = {"id": 0, "context": BOOK, "multi_turns": [{"input": "Who designed it?", "answer": "Gustave Eiffel"}]}
    (question,) = records_to_samples("scbench:qa_eng", [qa], "fixture")
    assert question.context == "Read the book and answer the question. Be very concise in your answer.\n\n" + BOOK
    assert question.question == "\n\nQuestion: Who designed it?\nAnswer:"
    assert (question.max_new_tokens, question.metric) == (40, "scbench_qa")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": 0, "context": "c"}, "no field 'multi_turns'"),
        ({"id": 0, "context": "c", "multi_turns": []}, "non-empty list"),
        ({"id": 0, "context": "c", "multi_turns": [{"input": "q"}]}, "turn 0: record has no field 'answer'"),
    ],
)
def test_bad_rows_are_one_line(record, message):
    from kvbench.tasks.datasets.catalog import records_to_samples

    with pytest.raises(TaskError, match=message) as error:
        records_to_samples("scbench:kv", [record], "fixture")
    assert "\n" not in str(error.value)


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    return isolate_caches(tmp_path, monkeypatch)


def run(model, out, data, samples, methods="snapkv"):
    argv = [
        "run", "--model", model, "--methods", methods, "--budgets", "0.5", "--tasks", "scbench:kv,scbench:qa_eng",
        "--samples", str(samples), "--out", str(out), "--no-progress", "--no-report", "--data", f"scbench={data}",
    ]  # fmt: skip
    assert main(argv) == 0
    return sorted(
        (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()),
        key=lambda row: (row["task"], row["sample_id"]),
    )


QA = {"id": 0, "context": BOOK, "multi_turns": [{"input": "Who designed it?", "answer": "Gustave Eiffel"},
                                                {"input": "Where is it?", "answer": "Paris"}]}  # fmt: skip


def test_turns_share_one_compression(chat_model_dir, tmp_path, monkeypatch, isolated_caches):
    calls = snapkv_compressions(monkeypatch)
    data = tmp_path / "data"
    write_jsonl(data / "scbench_kv.jsonl", [kv_row(7, [3, 5])])
    write_jsonl(data / "scbench_qa_eng.jsonl", [QA])
    together = run(chat_model_dir, tmp_path / "together", data, 2)
    assert len(calls) == 2  # one compression per context (kv's, qa_eng's) for the four turns
    kv = [row for row in together if row["task"] == "scbench:kv"]
    assert [(row["sample_id"], row["turn"], row["context_id"]) for row in kv] == [(0, 0, 0), (1, 1, 0)]
    assert [row["references"] for row in kv] == [["value-3"], ["value-5"]]
    assert [row["turn"] for row in together if row["task"] == "scbench:qa_eng"] == [0, 1]
    for row in together:
        assert "error" not in row and row["score"] in (0.0, 100.0)
        assert row["metric"] == ("scbench_retrieval" if row["task"] == "scbench:kv" else "scbench_qa")
        if row["metric"] == "scbench_retrieval":  # compute_scores.py: the answer inside the prediction
            assert row["score"] == (100.0 if row["references"][0] in row["output"] else 0.0)


@pytest.mark.slow
def test_each_turn_equals_a_run_of_that_turn_alone(chat_model_dir, tmp_path, monkeypatch, isolated_caches):
    calls = snapkv_compressions(monkeypatch)
    data = tmp_path / "data"
    write_jsonl(data / "scbench_kv.jsonl", [kv_row(7, [3, 5, 9])])
    write_jsonl(data / "scbench_qa_eng.jsonl", [QA])
    together = run(chat_model_dir, tmp_path / "together", data, 3)
    assert len(calls) == 2
    for task, rows in (("kv", [kv_row(7, [k]) for k in (3, 5, 9)]), ("qa_eng", None)):
        turns = rows or [{**QA, "multi_turns": [turn]} for turn in QA["multi_turns"]]
        shared = [row for row in together if row["task"] == f"scbench:{task}"]
        for index, row in enumerate(turns):
            calls.clear()
            alone = tmp_path / f"alone-{task}-{index}"
            write_jsonl(alone / f"scbench_{task}.jsonl", [row])
            argv = [
                "run", "--model", chat_model_dir, "--methods", "snapkv", "--budgets", "0.5", "--tasks",
                f"scbench:{task}", "--samples", "1", "--out", str(alone / "run"), "--no-progress", "--no-report",
                "--data", f"scbench={alone}",
            ]  # fmt: skip
            assert main(argv) == 0 and len(calls) == 1
            (single,) = [json.loads(line) for line in (alone / "run" / "results.jsonl").read_text().splitlines()]
            assert single["output"] == shared[index]["output"] and single["kv_bytes"] == shared[index]["kv_bytes"]


def test_missing_data_set_is_one_line_before_the_model_loads(chat_model_dir, tmp_path, capsys, monkeypatch,
                                                             isolated_caches):  # fmt: skip
    err = missing_data_set_line(chat_model_dir, "scbench:qa_eng", tmp_path, capsys, monkeypatch)
    assert "data set scbench:qa_eng not found" in err and "scbench/scbench_qa_eng.jsonl" in err
    assert "microsoft/SCBench scbench_qa_eng, split test" in err
    assert "kvbench data fetch scbench:qa_eng" in err


def test_list_and_unknown_subsets(tmp_path, capsys, isolated_caches):
    write_jsonl(tmp_path / "sc" / "scbench_kv.jsonl", [kv_row(0, [1])])
    assert main(["list", "tasks", "--data", f"scbench={tmp_path / 'sc'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "present" in next(line for line in lines if line.startswith("scbench:kv "))
    assert "absent" in next(line for line in lines if line.startswith("scbench:qa_eng "))
    assert any(line.startswith("scbench:prefix_suffix ") for line in lines)
    argv = ["run", "--model", "smollm2-135m", "--methods", "full", "--budgets", "1", "--out", str(tmp_path / "o"),
            "--tasks", "scbench:summary"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown scbench subset 'summary'" in err


def test_fetch_writes_the_copy_the_loader_reads(tmp_path, monkeypatch, capsys, isolated_caches):
    import datasets

    from kvbench.tasks.datasets import catalog

    asked = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        return [kv_row(4, [1, 2])]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert main(["data", "fetch", "scbench:kv"]) == 0
    assert asked == [("microsoft/SCBench", "scbench_kv", "test")]  # run_scbench.py's load_dataset call
    target = tmp_path / "kvbench-cache" / "data" / "scbench" / "scbench_kv.jsonl"
    assert f"scbench:kv: 1 records -> {target}" in capsys.readouterr().out
    monkeypatch.setattr(catalog, "_hub_rows", lambda *a: None)
    located, _ = catalog.locate("scbench:kv", {})
    assert located is not None and located.path == target
    turns = catalog.records_to_samples("scbench:kv", catalog.read_records(located), located.where)
    assert [s.references for s in turns] == [["value-1"], ["value-2"]]

"""Data sets through `kvbench run`: a few records in each benchmark's official schema, built here (no network), run
end to end on a tiny model; the prompts built from them against the official templates written out by hand; a
missing data set refused in one line before the model loads; one context with three questions compressed once."""

from __future__ import annotations

import json
import os

import pytest
from dataset_fixtures import isolate_caches, missing_data_set_line, snapkv_compressions, write_jsonl

from kvbench.harness.cli.commands import main

PASSAGE = (
    "Passage 1:\nThe Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by the company of "
    "Gustave Eiffel and built for the 1889 World's Fair. "
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    return isolate_caches(tmp_path, monkeypatch)


def longbench_records(subset, n=2, words=60):
    return [
        {
            "input": f"Who designed the tower number {i}?",
            "context": PASSAGE + FILLER * (words // 20),
            "answers": ["Gustave Eiffel"],
            "length": 120 + i,
            "dataset": subset,
            "language": "en",
            "all_classes": ["Human", "Location"] if subset == "trec" else None,
            "_id": f"id{i}",
        }
        for i in range(n)
    ]


def run_args(model, out, tasks, *extra, samples="2", methods="full,streaming_llm", batch="1"):
    return [
        "run", "--model", model, "--methods", methods, "--budgets", "0.5", "--tasks", tasks,
        "--samples", samples, "--out", str(out), "--no-progress", "--no-report", "--batch-size", batch, *extra,
    ]  # fmt: skip


def rows_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_longbench_prompt_follows_the_official_template(tasks_chat_tokenizer):
    from kvbench.tasks.datasets.catalog import records_to_samples

    (sample,) = records_to_samples("longbench:hotpotqa", longbench_records("hotpotqa", 1), "fixture")
    # dataset2prompt.json's hotpotqa template, cut at {context}
    assert sample.context == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n" + PASSAGE + FILLER * 3
    )
    assert sample.question == (
        "\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: Who designed the tower number 0?\nAnswer:"
    )
    assert (sample.max_new_tokens, sample.metric) == (32, "longbench_qa_f1")
    assert sample.metadata["chat_template"] is True and sample.metadata["metric_options"] == {"first_line": False}
    (trec,) = records_to_samples("longbench:trec", longbench_records("trec", 1), "fixture")
    assert trec.metadata["chat_template"] is False  # pred.py: no chat template for trec
    assert trec.metadata["metric_options"] == {"first_line": True, "all_classes": ["Human", "Location"]}


def test_no_chat_template_subsets_get_the_raw_prompt(tasks_chat_tokenizer):
    from kvbench.tasks.datasets.catalog import records_to_samples
    from kvbench.tasks.datasets.lengths import sample_prompt

    (trec,) = records_to_samples("longbench:trec", longbench_records("trec", 1), "fixture")
    parts = sample_prompt(tasks_chat_tokenizer, trec)
    assert parts.context_text == "<s>" + trec.context and parts.question_text == trec.question
    (qa,) = records_to_samples("longbench:hotpotqa", longbench_records("hotpotqa", 1), "fixture")
    assert sample_prompt(tasks_chat_tokenizer, qa).context_text.startswith("<|im_start|>user\n")


def test_middle_truncation_keeps_both_ends(tasks_chat_tokenizer):
    from kvbench.tasks.datasets.catalog import records_to_samples
    from kvbench.tasks.datasets.lengths import fit_samples, measure

    records = longbench_records("hotpotqa", 1, words=2000)
    records[0]["context"] = "START " + records[0]["context"] + " FINISH"
    (sample,) = records_to_samples("longbench:hotpotqa", records, "fixture")
    full = measure(tasks_chat_tokenizer, sample)
    (cut,) = fit_samples([sample], tasks_chat_tokenizer, 300)
    assert full > 300 and measure(tasks_chat_tokenizer, cut) <= 300
    assert cut.metadata["truncated_from"] == full and cut.metadata["sample_tokens"] <= 300
    assert "START" in cut.context and cut.context.endswith("FINISH")  # head and tail kept, the middle cut
    (skipped,) = fit_samples([sample], tasks_chat_tokenizer, 300, over_length="skip")
    assert "over the 300-token cap" in skipped.metadata["skipped"]


def test_longbench_v2_prompt_and_breakdown_fields():
    from kvbench.tasks.datasets.catalog import records_to_samples

    record = {
        "_id": "x", "domain": "Single-Document QA", "sub_domain": "A", "difficulty": "hard", "length": "short",
        "question": "Which city?", "choice_A": "Paris", "choice_B": "Rome", "choice_C": "Oslo", "choice_D": "Bern",
        "answer": "A", "context": "It is in Paris.",
    }  # fmt: skip
    (sample,) = records_to_samples("longbench_v2", [record], "fixture")
    assert sample.context + sample.question == (
        "Please read the following text and answer the question below.\n\n<text>\nIt is in Paris.\n</text>\n\n"
        "What is the correct answer to this question: Which city?\nChoices:\n(A) Paris\n(B) Rome\n(C) Oslo\n"
        '(D) Bern\n\nFormat your response as follows: "The correct answer is (insert answer here)".'
    )
    assert (sample.references, sample.metadata["difficulty"], sample.metadata["length_class"]) == (
        ["A"],
        "hard",
        "short",
    )


def test_infinitebench_choice_references_pair_text_and_letter():
    from kvbench.tasks.datasets.catalog import records_to_samples

    record = {"id": 0, "context": "ctx", "input": "Who?", "answer": ["Bob"], "options": ["Al", "Bob", "Cy", "Di"]}
    (sample,) = records_to_samples("infinitebench:longbook_choice_eng", [record], "fixture")
    assert sample.references == ["Bob", "B"]
    assert sample.question == "\n\nQuestion: Who?\nA. Al\nB. Bob\nC. Cy\nD. Di\n\nThe letter of the correct answer is"


def dataset_fixtures(root):
    """One small copy per data set in its official schema, laid out as `--data NAME=DIR` reads it."""
    ruler_input = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
        "you about the numbers afterwards.\n" + FILLER * 8 + "One of the special magic numbers for sweet-tea is: "
        "4123512.\n" + FILLER * 4 + "\nWhat are all the special magic numbers for sweet-tea mentioned in the "
        "provided text? The special magic numbers for sweet-tea mentioned in the provided text are"
    )
    write_jsonl(
        root / "ruler" / "niah_single_1" / "validation.jsonl",
        [{"index": i, "input": ruler_input, "outputs": ["4123512"], "length": 300} for i in range(2)],
    )
    write_jsonl(root / "longbench" / "hotpotqa.jsonl", longbench_records("hotpotqa"))
    write_jsonl(root / "longbench" / "trec.jsonl", longbench_records("trec"))
    write_jsonl(root / "longbench_e" / "hotpotqa_e.jsonl", longbench_records("hotpotqa"))
    v2 = {
        "_id": "a", "domain": "d", "sub_domain": "s", "difficulty": "easy", "length": "short",
        "question": "Which city?", "choice_A": "Paris", "choice_B": "Rome", "choice_C": "Oslo", "choice_D": "Bern",
        "answer": "A", "context": PASSAGE + FILLER * 3,
    }  # fmt: skip
    (root / "longbench_v2").mkdir(parents=True)
    (root / "longbench_v2" / "data.json").write_text(json.dumps([v2, {**v2, "_id": "b", "difficulty": "hard"}]))
    kv = json.dumps({f"key-{i}": f"value-{i}" for i in range(20)})
    write_jsonl(
        root / "infinitebench" / "kv_retrieval.jsonl",
        [{"id": i, "context": kv, "input": "Key: key-3\nThe value associated with the specified key is:",
          "answer": ["value-3"], "options": []} for i in range(2)],
    )  # fmt: skip
    write_jsonl(
        root / "needle" / "essays.jsonl",
        [{"context": FILLER * 40, "needle": "The best thing to do in San Francisco is eating a sandwich.",
          "question": "What is the best thing to do in San Francisco?", "answer_prefix": "The best thing",
          "max_new_tokens": 16}],
    )  # fmt: skip
    return root


DATASET_TASKS = {
    "ruler": "ruler:niah_single_1",
    "longbench": "longbench:hotpotqa,longbench:trec",
    "longbench_e": "longbench_e:hotpotqa",
    "longbench_v2": "longbench_v2",
    "infinitebench": "infinitebench:kv_retrieval",
    "needle": "needle:essays",
}


def test_every_data_set_runs_end_to_end(chat_model_dir, tmp_path):
    data = dataset_fixtures(tmp_path / "data")
    out = tmp_path / "run"
    flags = [f"--data={name}={data / name}" for name in DATASET_TASKS]
    tasks = ",".join(DATASET_TASKS.values())
    # one sample each (the needle: one depth, 50%), full and streaming_llm decoded in one batch: the official
    # generation lengths (128 tokens for RULER and LongBench-v2) dominate the time
    assert main(run_args(chat_model_dir, out, tasks, "--lengths", "400", *flags, samples="1", batch="2")) == 0
    rows = rows_of(out)
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    expected = {
        "ruler:niah_single_1": "string_match_all",
        "longbench:hotpotqa": "longbench_qa_f1",
        "longbench:trec": "longbench_classification",
        "longbench_e:hotpotqa": "longbench_qa_f1",
        "longbench_v2": "longbench_v2_choice",
        "infinitebench:kv_retrieval": "infbench_kv_retrieval",
        "needle:essays": "needle_rougeL",
    }
    assert set(by_task) == set(expected)
    for task, task_rows in by_task.items():
        assert {row["metric"] for row in task_rows} == {expected[task]}
        assert len(task_rows) == 2  # one sample x (full, streaming_llm@0.5)
        for row in task_rows:
            assert row["length"] == 400 and row["sample_tokens"] <= 400
            assert row["context_tokens"] + row["question_tokens"] <= 400
            assert "error" not in row and 0 <= row["score"] <= 100
    assert {row["depth"] for row in by_task["needle:essays"]} == {50}  # percent, as every task records it
    assert {row["difficulty"] for row in by_task["longbench_v2"]} == {"easy"}
    assert {row["references"][0] for row in by_task["needle:essays"]} == {
        "The best thing to do in San Francisco is eating a sandwich."
    }


def test_missing_data_set_is_one_line_before_the_model_loads(chat_model_dir, tmp_path, capsys, monkeypatch):
    err = missing_data_set_line(chat_model_dir, "longbench:hotpotqa", tmp_path, capsys, monkeypatch)
    assert "data set longbench:hotpotqa not found" in err
    assert "hotpotqa.jsonl" in err and "THUDM/LongBench hotpotqa" in err
    assert "kvbench data fetch longbench:hotpotqa" in err


def test_a_data_set_found_nowhere_is_said_before_torch_or_datasets_is_imported(chat_model_dir, tmp_path):
    """With no local file and no Hugging Face cache folder for it, the fast checks say the run's own message (every
    place looked) in one line, exit 2, in a process that never imports torch or `datasets`."""
    import subprocess
    import sys

    from kvbench.tasks.datasets import catalog

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "KVBENCH_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HF_HUB_CACHE", None), env.pop("HF_DATASETS_CACHE", None), env.pop("HUGGINGFACE_HUB_CACHE", None)
    argv = run_args(chat_model_dir, tmp_path / "run", "longbench:hotpotqa")
    script = (
        "import sys\nfrom kvbench.harness.cli.commands import main\ncode = main(sys.argv[1:])\n"
        "print('imported:', sorted(m for m in ('torch', 'datasets') if m in sys.modules))\nsys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "imported: []" in done.stdout
    (line,) = done.stderr.strip().splitlines()
    looked = [
        str(tmp_path / "cache" / "data" / "longbench" / "hotpotqa.jsonl"),
        "the Hugging Face cache (THUDM/LongBench hotpotqa, split test)",
    ]
    assert line == f"kvbench: error: {catalog.missing_message('longbench:hotpotqa', looked)}"


def test_a_hugging_face_cache_folder_leaves_the_decision_to_the_run(tmp_path, monkeypatch):
    """A download-cache folder (datasets--ORG--NAME) or a prepared one (ORG___snake_name) for any hub copy, or a
    local file, means the data set may be there: the fast check says nothing and `datasets` decides at run time."""
    from kvbench.tasks.datasets.presence import surely_missing

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    assert "not found" in surely_missing("longbench:hotpotqa", {}, 4096)
    (tmp_path / "hf" / "datasets" / "THUDM___long_bench").mkdir(parents=True)
    assert surely_missing("longbench:hotpotqa", {}, 4096) is None
    assert "not found" in surely_missing("longbench_v2", {}, 4096)  # another data set's folder is not this one's
    (tmp_path / "hf" / "hub" / "datasets--THUDM--LongBench-v2").mkdir(parents=True)
    assert surely_missing("longbench_v2", {}, 4096) is None
    assert "not found" in surely_missing("aime25", {}, 4096)
    (tmp_path / "hf" / "hub" / "datasets--alessiodevoto--aime25").mkdir(parents=True)  # kvpress's copy counts
    assert surely_missing("aime25", {}, 4096) is None
    write_jsonl(tmp_path / "cache" / "data" / "infinitebench" / "kv_retrieval.jsonl", [{"id": 0}])
    assert surely_missing("infinitebench:kv_retrieval", {}, 4096) is None
    assert surely_missing("ruler:niah_single_1", {}, None) is None  # its hub copy depends on the length: the run


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "longbench:nope"], "unknown longbench subset 'nope'"),
        (["--tasks", "nosuch:x"], "unknown data set 'nosuch'"),
        (["--tasks", "niah_single_1"], "give --lengths"),
        (["--tasks", "longbench:hotpotqa", "--data", "longbench=/no/such/dir"], "no such file or directory"),
        (["--tasks", "longbench:hotpotqa", "--data", "longbench"], "must be NAME=PATH"),
    ],
)
def test_data_argument_errors_are_one_line(tmp_path, capsys, args, message):
    argv = ["run", "--model", "smollm2-135m", "--methods", "full", "--budgets", "1", "--out", str(tmp_path / "o")]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_list_tasks_shows_which_data_sets_are_present(tmp_path, capsys):
    data = dataset_fixtures(tmp_path / "data")
    assert main(["list", "tasks", "--data", f"longbench={data / 'longbench'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    hotpot = next(line for line in lines if line.startswith("longbench:hotpotqa "))
    qasper = next(line for line in lines if line.startswith("longbench:qasper "))
    assert "present" in hotpot and str(data / "longbench" / "hotpotqa.jsonl") in hotpot
    assert "absent" in qasper


def test_over_length_samples_are_skipped_and_counted(chat_model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "longbench" / "hotpotqa.jsonl", longbench_records("hotpotqa", words=600))
    out = tmp_path / "run"
    args = run_args(chat_model_dir, out, "longbench:hotpotqa", "--lengths", "200", "--over-length", "skip")
    assert main([*args, "--data", f"longbench={data / 'longbench'}"]) == 0
    rows = rows_of(out)
    assert len(rows) == 4 and all(row["skipped"] and row["score"] is None for row in rows)
    assert all(row["sample_tokens"] > 200 for row in rows)


def kvpress_rows(questions):
    context = PASSAGE + FILLER * 12
    return [
        {"context": context, "question": q, "answer_prefix": "Answer:", "answer": ["Eiffel"], "max_new_tokens": 6}
        for q in questions
    ]


def test_one_context_three_questions_compressed_once_and_equal_to_separate_runs(chat_model_dir, tmp_path, monkeypatch):
    calls = snapkv_compressions(monkeypatch)
    questions = ["Who designed the tower?", "Where is the tower?", "When was it built?"]
    data = tmp_path / "data"
    write_jsonl(data / "kvpress" / "shared.jsonl", kvpress_rows(questions))
    out = tmp_path / "together"
    argv = run_args(chat_model_dir, out, "kvpress:shared", samples="3", methods="snapkv")
    assert main([*argv, "--data", f"kvpress={data / 'kvpress'}"]) == 0
    assert len(calls) == 1  # one compression of the shared context for the three questions
    together = sorted(rows_of(out), key=lambda row: row["sample_id"])
    assert [row["context_id"] for row in together] == [0, 0, 0]
    calls.clear()  # resuming the finished store computes nothing
    assert main([*argv, "--data", f"kvpress={data / 'kvpress'}"]) == 0
    assert calls == [] and len(rows_of(out)) == 3
    for index, question in enumerate(questions):
        calls.clear()
        alone = tmp_path / f"alone{index}"
        write_jsonl(data / f"kvpress{index}" / "shared.jsonl", kvpress_rows([question]))
        argv = run_args(chat_model_dir, alone, "kvpress:shared", samples="1", methods="snapkv")
        assert main([*argv, "--data", f"kvpress={data / f'kvpress{index}'}"]) == 0
        (row,) = rows_of(alone)
        assert row["output"] == together[index]["output"] and row["kv_bytes"] == together[index]["kv_bytes"]
        assert len(calls) == 1


def test_one_contexts_questions_decode_in_one_batch_with_the_answers_they_get_alone(
    chat_model_dir, tmp_path, monkeypatch
):
    """--batch-size 3: the three questions of one context decode as one batch of three rows per cell (each row its
    own copy of the compressed cache, `decode_batch` 3), the context still compressed once per cell, and every
    answer equals the unbatched run's; a decode-time method (tova evicting while decoding) among them."""
    calls = snapkv_compressions(monkeypatch)
    questions = ["Who designed the tower?", "Where is the tower?", "When was it built?"]
    data = tmp_path / "data"
    write_jsonl(data / "kvpress" / "shared.jsonl", kvpress_rows(questions))
    outputs = {}
    for batch in ("1", "3"):
        out = tmp_path / f"batch{batch}"
        argv = run_args(chat_model_dir, out, "kvpress:shared", samples="3", methods="snapkv,tova", batch=batch)
        calls.clear()
        assert main([*argv, "--data", f"kvpress={data / 'kvpress'}"]) == 0
        assert len(calls) == 1  # snapkv compressed the shared context once for its three questions
        rows = rows_of(out)
        assert {row["decode_batch"] for row in rows} == {int(batch)}
        outputs[batch] = {(r["method"], r["sample_id"]): (r["output"], r["kv_bytes"], r["new_tokens"]) for r in rows}
    assert len(outputs["1"]) == 6 and outputs["3"] == outputs["1"]


def test_the_hugging_face_cache_is_read_offline_after_local_copies(tmp_path, monkeypatch):
    from kvbench.tasks.datasets import catalog

    asked = []

    def cached(hub_id, config, split):
        asked.append((hub_id, config, split))
        return (
            longbench_records("hotpotqa", 1)
            if (hub_id, config, split) == ("THUDM/LongBench", "hotpotqa_e", "test")
            else None
        )

    monkeypatch.setattr(catalog, "_hub_rows", cached)
    located, looked = catalog.locate("longbench_e:hotpotqa", {})
    assert located is not None and located.hub == ("THUDM/LongBench", "hotpotqa_e", "test")
    assert looked[0].endswith("kvbench-cache/data/longbench_e/hotpotqa_e.jsonl")
    assert len(catalog.read_records(located)) == 1
    # a local copy wins over the hub cache, which is then not consulted
    asked.clear()
    write_jsonl(tmp_path / "kvbench-cache" / "data" / "longbench_e" / "hotpotqa_e.jsonl", longbench_records("x", 2))
    located, _ = catalog.locate("longbench_e:hotpotqa", {})
    assert located.path is not None and asked == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "fetch", "kvpress:x"], "kvpress has no hub copy"),
        (["data", "fetch", "ruler:vt"], "needs --length N"),
        (["data", "fetch", "longbench:nope"], "unknown longbench subset"),
    ],
)
def test_data_fetch_argument_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err

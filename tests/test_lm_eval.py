"""lm-eval integration on a tiny local model, offline: registration, KVBenchLM on a plain local-JSONL task,
loglikelihood semantics, and `kvbench lm-eval` on an exported kvbench task against `kvbench run`."""

import json
import os
import subprocess
import sys
import textwrap

import lm_eval
import pytest
import torch
from conftest import build_tasks_tokenizer
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tiny_models import tiny_model

from kvbench.harness.cli.commands import main
from kvbench.harness.engine.pipeline import run_context
from kvbench.harness.lm_eval.adapter import KVBenchLM
from kvbench.harness.models.loading import LoadedModel
from kvbench.harness.runner.store import ResultStore
from kvbench.methods import get_method

PASSAGE = (
    "The assert statement is a convenient way to insert debugging assertions into a program. "
    "The simple form evaluates an expression and raises an error when it is false."
)
PLAIN_TASKS = {
    "plain_gen": """
        output_type: generate_until
        doc_to_text: "{{passage}}\\nQuestion: {{question}}\\nAnswer:"
        doc_to_target: answer
        generation_kwargs: {until: ["\\n\\n"], max_gen_toks: 6, do_sample: false}
        metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
    """,
    "plain_choice": """
        output_type: multiple_choice
        doc_to_text: "{{passage}}\\nQuestion: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
    """,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    tokenizer = build_tasks_tokenizer(chat_template=True)
    model = tiny_model("llama-gqa", layers=2, vocab=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root, LoadedModel("tiny", "tiny", model, tokenizer, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def plain_tasks(tiny):
    """Two lm-eval tasks over a local JSONL written here: nothing kvbench-specific in them."""
    root, _ = tiny
    folder = root / "plain_tasks"
    folder.mkdir()
    docs = [
        {"passage": PASSAGE, "question": "What raises an error?", "answer": "assert", "choices": ["assert", "loop"]},
        {"passage": PASSAGE * 2, "question": "What is it for?", "answer": "debugging", "choices": ["fun", "debug"]},
    ]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc | {"label": 1}) + "\n" for doc in docs))
    for name, body in PLAIN_TASKS.items():
        header = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}\n"
        )
        (folder / f"{name}.yaml").write_text(header + "test_split: test\n" + textwrap.dedent(body))
    return TaskManager(include_path=str(folder), include_defaults=False), docs


def evaluate(lm, manager, tasks):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)


def test_registration_is_lazy_and_keeps_lm_evals_own_models():
    code = (
        "import sys, kvbench.harness\n"
        "from lm_eval.api.registry import model_registry\n"
        "assert 'lm_eval.models.huggingface' not in sys.modules and 'torch' not in sys.modules\n"
        "print(model_registry._objs['kvbench'], 'hf' in model_registry)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kvbench.harness.lm_eval.adapter:KVBenchLM", "True"]
    assert get_model("kvbench") is KVBenchLM and get_model("hf") is HFLM


def test_plain_jsonl_generation_task_runs_through_the_compressed_path(tiny, plain_tasks):
    _, loaded = tiny
    manager, docs = plain_tasks
    lm = KVBenchLM(pretrained=loaded, method="snapkv", budget=0.25, question_tokens=8)
    results = evaluate(lm, manager, ["plain_gen"])
    logged = sorted(results["samples"]["plain_gen"], key=lambda sample: sample["doc_id"])
    assert [sample["doc_id"] for sample in logged] == [0, 1]
    for sample in logged:
        prompt, gen_kwargs = sample["arguments"][0]
        ids = loaded.tokenizer.encode(prompt)
        context_ids, question_ids = ids[:-8], ids[-8:]
        (expected,) = run_context(loaded, context_ids, question_ids, [(get_method("snapkv"), 0.25)], 6, ["\n\n"])
        assert sample["resps"][0][0] == expected.output
        record = lm.records[("plain_gen", sample["doc_id"])]
        assert (record.context_tokens, record.question_tokens) == (len(context_ids), 8)
        assert record.kv_bytes <= 0.27 * record.kv_bytes_full
    assert "exact_match,none" in results["results"]["plain_gen"]


def test_loglikelihood_with_full_equals_lm_evals_own_hflm(tiny, plain_tasks):
    _, loaded = tiny
    manager, _ = plain_tasks
    ours = evaluate(KVBenchLM(pretrained=loaded, method="full"), manager, ["plain_choice"])["samples"]["plain_choice"]
    plain = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    theirs = evaluate(plain, manager, ["plain_choice"])["samples"]["plain_choice"]
    for mine, reference in zip(ours, theirs):
        assert [r[0][0] for r in mine["resps"]] == pytest.approx([r[0][0] for r in reference["resps"]], rel=1e-4)
        assert [r[0][1] for r in mine["resps"]] == [r[0][1] for r in reference["resps"]]
    compressed = KVBenchLM(pretrained=loaded, method="streaming_llm", budget=0.25, question_tokens=4)
    squeezed = evaluate(compressed, manager, ["plain_choice"])["samples"]["plain_choice"]
    assert [r[0][0] for r in squeezed[1]["resps"]] != pytest.approx([r[0][0] for r in ours[1]["resps"]], abs=1e-5)
    assert (
        compressed.records[("plain_choice", 1)].kv_bytes < 0.3 * compressed.records[("plain_choice", 1)].kv_bytes_full
    )


def test_model_name_route_loads_through_kvbench(tiny, plain_tasks):
    root, _ = tiny
    manager, _ = plain_tasks
    results = lm_eval.simple_evaluate(
        model="kvbench",
        model_args=f"pretrained={root / 'model'},method=snapkv,budget=0.25,question_tokens=8,device=cpu",
        tasks=["plain_gen"],
        task_manager=manager,
        bootstrap_iters=0,
    )
    assert results["config"]["kvbench_method"] == "snapkv" and results["config"]["kvbench_budget"] == 0.25
    assert results["n-samples"]["plain_gen"]["effective"] == 2  # both docs ran (the key every lm-eval 0.4.x writes)


@pytest.fixture(scope="module")
def niah_runs(tiny, tmp_path_factory):
    """kvbench run and kvbench lm-eval (on the exported niah task) over the same samples, methods and budget."""
    root, _ = tiny
    out = tmp_path_factory.mktemp("niah")
    patch = pytest.MonkeyPatch()
    patch.setenv("KVBENCH_CACHE_DIR", str(out / "cache"))
    model = str(root / "model")
    common = ["--methods", "full,snapkv", "--budgets", "0.25", "--no-report", "--no-progress"]
    try:
        assert main(["export-lm-eval", "--model", model, "--tasks", "niah_single_1", "--lengths", "512",
                     "--samples", "2", "--out", str(out / "tasks")]) == 0  # fmt: skip
        assert main(["run", "--model", model, "--tasks", "niah_single_1", "--lengths", "512", "--samples", "2",
                     "--out", str(out / "run"), *common]) == 0  # fmt: skip
        assert main(["lm-eval", "--model", model, "--tasks", "kvbench_niah_single_1_512", "--include-path",
                     str(out / "tasks"), "--out", str(out / "lm"), *common]) == 0  # fmt: skip
    finally:
        patch.undo()

    def rows(name):
        return [json.loads(line) for line in (out / name / "results.jsonl").read_text().splitlines()]

    return out, rows("run"), rows("lm")


def test_lm_eval_on_exported_niah_matches_kvbench_run(niah_runs):
    _, run_rows, lm_rows = niah_runs
    assert len(run_rows) == len(lm_rows) == 4
    keyed = {(row["sample_id"], row["method"], row["budget"]): row for row in lm_rows}
    for row in run_rows:
        twin = keyed[(row["sample_id"], row["method"], row["budget"])]
        assert twin["task"] == "kvbench_niah_single_1_512" and twin["metric"] == row["metric"] == "string_match_all"
        same = ("output", "score", "kv_bytes", "kv_bytes_full", "context_tokens", "question_tokens", "new_tokens")
        assert {k: twin[k] for k in same} == {k: row[k] for k in same}
        assert twin["length"] == row["length"] == 512


def test_lm_eval_takes_token_budgets_as_kvbench_run_does(niah_runs, tiny, tmp_path, monkeypatch):
    """--budgets 64t: snapkv keeps 64 tokens per KV head of each context, the rows say budget_tokens 64 (a cell of
    its own, beside 0.25), and each equals kvbench run's row at 64t on the same sample."""
    out, _, _ = niah_runs
    root, _ = tiny
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(out / "cache"))
    model = str(root / "model")
    common = ["--methods", "snapkv", "--budgets", "64t,0.25", "--no-report", "--no-progress"]
    assert main(["run", "--model", model, "--tasks", "niah_single_1", "--lengths", "512", "--samples", "2",
                 "--out", str(tmp_path / "run"), *common]) == 0  # fmt: skip
    assert main(["lm-eval", "--model", model, "--tasks", "kvbench_niah_single_1_512", "--include-path",
                 str(out / "tasks"), "--out", str(tmp_path / "lm"), *common]) == 0  # fmt: skip

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]

    lm_rows = rows("lm")
    assert sorted((row["budget"], row.get("budget_tokens")) for row in lm_rows) == [
        (0.25, None), (0.25, None), (64.0, 64), (64.0, 64)
    ]  # fmt: skip
    keyed = {(row["sample_id"], row.get("budget_tokens"), row["budget"]): row for row in lm_rows}
    for row in rows("run"):
        twin = keyed[(row["sample_id"], row.get("budget_tokens"), row["budget"])]
        same = ("output", "score", "kv_bytes", "kv_bytes_full", "context_tokens")
        assert {k: twin[k] for k in same} == {k: row[k] for k in same}
        if row.get("budget_tokens"):
            assert twin["kv_bytes"] * twin["context_tokens"] == 64 * twin["kv_bytes_full"]


def test_lm_eval_run_records_metadata_and_skips_finished_cells(niah_runs, tiny):
    out, _, lm_rows = niah_runs
    meta = json.loads((out / "lm" / "run.json").read_text())
    assert meta["runner"] == "lm-eval" and meta["versions"]["lm_eval"] and meta["finished_at"]
    assert [entry["command"].split()[1] for entry in meta["invocations"]] == ["lm-eval"]
    assert meta["identity"]["question_tokens"] == 64 and meta["identity"]["apply_chat_template"] is False
    assert {row["method_label"] for row in lm_rows} == {"full", "snapkv"}
    before = (out / "lm" / "results.jsonl").read_bytes()
    root, _ = tiny
    args = ["lm-eval", "--model", str(root / "model"), "--methods", "full,snapkv", "--budgets", "0.25", "--tasks",
            "kvbench_niah_single_1_512", "--include-path", str(out / "tasks"), "--out", str(out / "lm"),
            "--no-report", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert (out / "lm" / "results.jsonl").read_bytes() == before
    assert len(json.loads((out / "lm" / "run.json").read_text())["invocations"]) == 2


def test_lm_eval_limit_raised_computes_only_the_new_docs(niah_runs, tiny, tmp_path, monkeypatch):
    """--limit 1 then no limit: the second run evaluates doc 1 alone and leaves doc 0's rows as they were."""
    out, _, _ = niah_runs
    root, _ = tiny
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(out / "cache"))
    evaluated = []
    from kvbench.harness.lm_eval import run as lm_eval_run

    original = lm_eval_run._evaluate

    def spy(loaded, method, budget, manager, spec, docs, fields):
        evaluated.append((method.label, docs))
        return original(loaded, method, budget, manager, spec, docs, fields)

    monkeypatch.setattr(lm_eval_run, "_evaluate", spy)
    args = ["lm-eval", "--model", str(root / "model"), "--methods", "snapkv", "--budgets", "0.25", "--tasks",
            "kvbench_niah_single_1_512", "--include-path", str(out / "tasks"), "--out", str(tmp_path / "lm"),
            "--no-report", "--no-progress"]  # fmt: skip
    assert main([*args, "--limit", "1"]) == 0
    first = (tmp_path / "lm" / "results.jsonl").read_text().splitlines()
    assert main(args) == 0
    rows = (tmp_path / "lm" / "results.jsonl").read_text().splitlines()
    assert rows[: len(first)] == first and len(rows) == 2 * len(first)
    assert evaluated == [("snapkv", {"kvbench_niah_single_1_512": [0]}), ("snapkv", {"kvbench_niah_single_1_512": [1]})]


def test_lm_eval_question_tokens_is_part_of_the_identity(niah_runs, tiny, capsys):
    out, _, _ = niah_runs
    root, _ = tiny
    args = ["lm-eval", "--model", str(root / "model"), "--methods", "full", "--budgets", "0.25", "--tasks",
            "kvbench_niah_single_1_512", "--include-path", str(out / "tasks"), "--out", str(out / "lm"),
            "--no-report", "--no-progress", "--question-tokens", "32"]  # fmt: skip
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "question_tokens 64 (now 32)" in error and "\n" not in error


def test_lm_eval_refuses_a_store_another_run_writes(niah_runs, tiny, capsys):
    """kvbench lm-eval writes result stores as kvbench run does, under the same lock."""
    out, _, _ = niah_runs
    root, _ = tiny
    before = (out / "lm" / "results.jsonl").read_bytes()
    args = ["lm-eval", "--model", str(root / "model"), "--methods", "full", "--budgets", "0.25", "--tasks",
            "kvbench_niah_single_1_512", "--include-path", str(out / "tasks"), "--out", str(out / "lm"),
            "--no-report", "--no-progress"]  # fmt: skip
    with ResultStore(out / "lm").writing():
        assert main(args) == 2
    assert capsys.readouterr().err == (
        f"kvbench: error: {out / 'lm'} is in use by another kvbench run (pid {os.getpid()}); "
        "wait for it or use another --out\n"
    )
    assert (out / "lm" / "results.jsonl").read_bytes() == before

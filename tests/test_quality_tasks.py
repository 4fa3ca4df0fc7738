"""Generation-quality tasks: reconstruction samples, ROUGE/BERTScore scorers, one row per metric in the sweep."""

import json
import re

import pytest
from conftest import build_tasks_tokenizer
from tiny_models import tiny_model

from kvbench.harness.cli.commands import main
from kvbench.tasks import METRICS, TASK_SETS, generate_samples, row_metrics, split_prompt
from kvbench.tasks.errors import TaskError
from kvbench.tasks.generated.reconstruction import CLOSE, INSTRUCTION, OPEN, PASSAGE_WORDS

QUALITY = ["rougeL", "rouge1", "rouge2", "bertscore_f1"]


def test_reconstruction_samples_mark_the_passage_they_ask_for(tasks_chat_tokenizer):
    samples = generate_samples("reconstruction", tasks_chat_tokenizer, 1024, 3)
    for sample in samples:
        (passage,) = sample.references
        assert len(passage.split()) == PASSAGE_WORDS
        assert f"{OPEN} {passage} {CLOSE}" in sample.context
        document = sample.context.removeprefix(INSTRUCTION)
        assert document.count(OPEN) == 1 and document.count(passage) == 1
        parts = split_prompt(tasks_chat_tokenizer, sample.context, sample.question, sample.answer_prefix)
        assert len(parts.context_ids) + len(parts.question_ids) + sample.max_new_tokens <= 1024
        assert row_metrics(sample) == QUALITY
    assert len({sample.references[0] for sample in samples}) == 3
    assert "reconstruction" not in TASK_SETS["RULER-11 offline"]


def test_rouge_scores_overlap():
    reference = ["the quick brown fox jumps over the lazy dog"]
    assert METRICS["rougeL"]("the quick brown fox jumps over the lazy dog", reference) == pytest.approx(1.0)
    assert METRICS["rouge1"]("cats sleep", reference) == 0.0
    half = METRICS["rouge2"]("the quick brown fox sleeps", reference)
    assert 0.0 < half < 1.0
    assert METRICS["rougeL"]("", reference) == 0.0
    with pytest.raises(TaskError):
        METRICS["rougeL"]("text", [])


def test_bertscore_runs_offline_on_the_packaged_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = ["The cat sat on the mat near the window."]
    same = METRICS["bertscore_f1"]("The cat sat on the mat near the window.", reference)
    close = METRICS["bertscore_f1"]("A cat was sitting on a mat by the window.", reference)
    far = METRICS["bertscore_f1"]("Quarterly revenue grew by nine percent.", reference)
    assert same == pytest.approx(1.0, abs=1e-4) and same > close > far
    assert METRICS["bertscore_f1"]("   ", reference) == 0.0


def test_perplexity_is_not_a_text_metric():
    with pytest.raises(TaskError, match="log-probabilities"):
        METRICS["perplexity"]("text", ["reference"])


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    tokenizer = build_tasks_tokenizer(chat_template=True)
    tiny_model("llama-gqa", layers=2, vocab=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    patch = pytest.MonkeyPatch()
    patch.setenv("KVBENCH_CACHE_DIR", str(root / "cache"))
    args = [
        "run", "--model", str(root / "model"), "--methods", "full,snapkv", "--budgets", "0.5",
        "--tasks", "reconstruction", "--lengths", "512", "--samples", "1", "--out", str(root / "run"), "--no-progress",
    ]  # fmt: skip
    try:
        assert main(args) == 0
    finally:
        patch.undo()
    return root, args


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_one_row_per_metric_with_scores_of_that_metric(quality_run):
    root, _ = quality_run
    rows = read_rows(root / "run")
    assert sorted((row["method"], row["metric"]) for row in rows) == sorted(
        (method, metric) for method in ("full", "snapkv") for metric in QUALITY
    )
    for row in rows:
        expected = round(100 * METRICS[row["metric"]](row["output"], row["references"]), 2)
        assert row["score"] == expected and 0 <= row["score"] <= 100


def test_rerun_completes_a_cell_whose_rows_were_cut_short(quality_run):
    root, args = quality_run
    rows = read_rows(root / "run")
    kept = [row for row in rows if not (row["method"] == "snapkv" and row["metric"] == "bertscore_f1")]
    (root / "run" / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    patch = pytest.MonkeyPatch()
    patch.setenv("KVBENCH_CACHE_DIR", str(root / "cache"))
    try:
        assert main([*args, "--no-report"]) == 0
    finally:
        patch.undo()
    again = read_rows(root / "run")
    assert len(again) == len(rows) and again[: len(kept)] == kept
    strip = {"prefill_s", "compress_s", "decode_s", "peak_memory_bytes", "decode_tokens_per_s"}
    assert {k: v for k, v in again[-1].items() if k not in strip} == {
        k: v for k, v in rows[-1].items() if k not in strip
    }


def test_report_has_quality_curves_per_metric(quality_run):
    root, _ = quality_run
    markdown = (root / "run" / "report.md").read_text()
    section = markdown.split("## Generation quality", 1)[1].split("\n## ", 1)[0]
    header = re.search(r"\| method \| budget \|(.*)\|", section).group(1)
    assert [cell.strip() for cell in header.split("|")] == ["rouge1", "rouge2", "rougeL", "bertscore_f1"]
    assert "plots/quality_vs_budget.png" in section
    assert (root / "run" / "plots" / "quality_vs_budget.png").stat().st_size > 10_000

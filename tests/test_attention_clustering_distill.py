"""attention_clustering's distillation fine-tuning (seed 003 step 4) and `kvbench train`, on tiny random models.

What must hold: the student really runs with the compression (the seed's wrapper never applied it, so its
student was its teacher), gradients reach the weights through the compressed cache, training lowers the loss,
and the saved model loads back as a kvbench model.
"""

import json

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import tiny_model

from kvbench.harness.cli.commands import main
from kvbench.harness.engine.prefill import streaming_forward
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.loading import load_model
from kvbench.methods import get_method
from kvbench.methods.attention_clustering.distill import (
    DistillationConfig,
    distill,
    distillation_loss,
    student_logits,
)
from kvbench.methods.attention_clustering.method import AttentionClusteringConfig, ClusteringStream, EntryPlan
from kvbench.methods.common.calibration_data import calibration_ids

METHOD = AttentionClusteringConfig(pruning_interval=32, lookback_window=16)
PLAN = EntryPlan(keep=48, clusters=12)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tasks_tokenizer(chat_template=False)


def fresh_model(tokenizer):
    return tiny_model("llama-gqa", layers=2, vocab=len(tokenizer))


def test_student_reads_through_the_compression(tokenizer):
    """Chunks before the first prune see the full cache (same logits as the teacher); after it they do not,
    and the stream ends with K entries per head."""
    model = fresh_model(tokenizer)
    ids = torch.tensor(calibration_ids(tokenizer, 128, seed=3))
    with torch.no_grad():
        teacher = model(input_ids=ids[None]).logits[0]
        student = student_logits(model, ids, METHOD, PLAN)
    # Chunks of 32: after 64 tokens the cache (64 > B = 48) is pruned and merged, so tokens 64.. see 12 centroids.
    torch.testing.assert_close(student[:64], teacher[:64], rtol=0, atol=1e-5)
    assert (student[64:] - teacher[64:]).abs().amax(dim=-1).min() > 1e-3
    stream = ClusteringStream(METHOD, PLAN, 128)
    cache, _ = streaming_forward(model, ids, stream.chunk_size, stream.after_chunk)
    assert all(layer.prefix.head_lengths() == [12, 12] and layer.tail_length == 0 for layer in cache.layers)


def test_gradients_reach_the_weights_through_the_compressed_cache(tokenizer):
    model = fresh_model(tokenizer)
    ids = torch.tensor(calibration_ids(tokenizer, 128, seed=4))
    with torch.no_grad():
        teacher = model(input_ids=ids[None]).logits[0]
    loss, mle, kl = distillation_loss(student_logits(model, ids, METHOD, PLAN), teacher, ids, 2.0, 0.5)
    assert kl > 0 and torch.isclose(loss, mle + 0.5 * 4 * kl)
    loss.backward()
    for layer in model.model.layers:
        assert layer.self_attn.k_proj.weight.grad.abs().sum() > 0
        assert layer.self_attn.v_proj.weight.grad.abs().sum() > 0


def test_kl_term_is_zero_when_student_and_teacher_agree():
    logits = torch.randn(10, 7)
    ids = torch.randint(0, 7, (10,))
    loss, mle, kl = distillation_loss(logits, logits, ids, 2.0, 0.5)
    assert kl.abs() < 1e-6 and torch.isclose(loss, mle, atol=1e-6)


def test_training_lowers_the_loss_and_records_the_run(tokenizer):
    model = fresh_model(tokenizer)
    config = DistillationConfig(
        steps=12, length=128, batch=1, learning_rate=3e-3, warmup_steps=2, max_cache_size=48, num_clusters=12
    )
    before = [p.detach().clone() for p in model.parameters()]
    record = distill(model, tokenizer, config, METHOD)
    losses = [entry["loss"] for entry in record["history"]]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model.training
    assert record["config"]["num_clusters"] == 12 and "documentation topics" in record["data"]
    assert record["history"][0]["lr"] == pytest.approx(3e-3 / 2)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(length=1024, max_cache_size=1024), "does not exceed the cache size"),
        (dict(num_clusters=64, max_cache_size=32, length=128), "exceeds --max-cache"),
        (dict(steps=0), "at least 1"),
    ],
)
def test_settings_that_cannot_train_are_refused(options, message):
    with pytest.raises(KVBenchError, match=message):
        DistillationConfig(**options)


def test_only_methods_with_a_training_step_have_one():
    assert get_method("attention_clustering").has_training_step
    assert not get_method("snapkv").has_training_step


def test_cli_trains_saves_and_the_result_loads(tmp_path, tokenizer, capsys):
    source, out = tmp_path / "tiny", tmp_path / "distilled"
    fresh_model(tokenizer).save_pretrained(source)
    tokenizer.save_pretrained(source)
    argv = ["train", "attention_clustering", "--model", str(source), "--out", str(out), "--steps", "2"]
    argv += ["--length", "128", "--batch", "1", "--max-cache", "48", "--clusters", "12", "--lr", "1e-3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "fine-tuned" in captured.out and "step 2/2" in captured.err
    record = json.loads((out / "train.json").read_text())
    assert len(record["history"]) == 2 and record["dtype"] == "float32"
    trained = load_model(str(out), "auto", "float32")
    original = load_model(str(source), "auto", "float32")  # training worked on a copy, not on this cached model
    assert any(
        not torch.equal(a, b) for a, b in zip(trained.model.parameters(), original.model.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "snapkv", "--out", "{tmp}/x"],
            "snapkv has no training step; methods that train: ",
        ),
        (["train", "nosuch", "--out", "{tmp}/x"], "unknown method"),
        (["train", "attention_clustering", "--out", "/proc/kvbench-out"], "cannot write to output directory"),
    ],
)
def test_cli_train_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

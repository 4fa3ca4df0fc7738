"""Stored contexts: a compressed context written to a file, reloaded and answered, answers exactly as the cache
did right after compression; a file of another model, another format or a corrupt one is one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import tiny_model

from kvbench.harness.cli.commands import main
from kvbench.harness.engine import stored_context
from kvbench.harness.engine.pipeline import compress_context
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method

CONTEXT = 96
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def loaded():
    tokenizer = build_tasks_tokenizer(chat_template=False)
    model = tiny_model("llama-gqa", layers=2, vocab=len(tokenizer))
    return LoadedModel("tiny", "memory:tiny-stored", model, tokenizer, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def ids(loaded):
    generator = torch.Generator().manual_seed(3)
    vocab = len(loaded.tokenizer)
    context = torch.randint(8, vocab - 10, (CONTEXT,), generator=generator).tolist()
    question = torch.randint(8, vocab - 10, (5,), generator=generator).tolist()
    return context, question


def _razor():
    method = get_method("razor", induction_fraction=0.5, echo_fraction=0.0)
    induction = torch.zeros(2, 2)
    induction[1, 0] = 1.0
    method.load_calibration({"echo": torch.zeros(2, 2), "induction": induction})
    return method


CALIBRATED = {}


def _method(loaded, spec: str):
    """A method ready to compress: calibrated on the tiny model once per spec (artifacts shared)."""
    if spec == "razor":
        return _razor()
    method = get_method(spec)
    if method.needs_calibration:
        if method.label not in CALIBRATED:
            CALIBRATED[method.label] = method.calibrate(loaded.model, loaded.tokenizer)
        method.load_calibration(CALIBRATED[method.label])
    return method


CELLS = [
    ("full", 1.0),
    ("snapkv", 0.4),
    ("streaming_llm", 0.3),
    ("razor", 0.7),
    ("zack:project_during_prefill=false:r_min=2:calibration_samples=1:calibration_tokens=256", 0.7),
    ("kivi:group_size=16:residual=16", 0.3),
    ("h2o:decode_evict=true", 0.4),
    ("tova:decode_evict=true", 0.4),
    ("uncomp:calibration_samples=1:calibration_tokens=256:entropy_rank=8", 0.4),
]


@pytest.mark.parametrize("spec,budget", CELLS, ids=[c[0].partition(":")[0] for c in CELLS])
def test_a_reloaded_context_answers_exactly_as_right_after_compression(loaded, ids, tmp_path, spec, budget):
    context_ids, question_ids = ids
    method = _method(loaded, spec)
    compressed = compress_context(loaded, None, method, budget, context_ids)
    kv_bytes = compressed.cache.kv_bytes()
    if spec.partition(":")[0] in ("h2o", "tova", "uncomp"):  # decode-time: its state travels in the file too
        assert compressed.cache.method_state is not None
    path = tmp_path / "context.pt"
    ident = stored_context.identity(loaded, method, budget)
    stored_context.save_context(path, compressed.cache, compressed.last_logits, ident, compressed.kv_bytes_full)
    first = stored_context.answer(
        loaded, method, compressed.cache, compressed.last_logits, question_ids, NEW_TOKENS, keep_logits=True
    )

    # A fresh method built from the stored label, as `--load-cache` builds it.
    stored = stored_context.read_context(path)
    again = _method(loaded, stored["method"]) if spec != "razor" else _razor()
    assert again.label == method.label
    stored_context.check_identity(stored, loaded, again)
    cache, logits = stored_context.rebuild(stored, again)
    assert cache.kv_bytes() == kv_bytes
    assert torch.equal(logits, compressed.last_logits)
    second = stored_context.answer(loaded, again, cache, logits, question_ids, NEW_TOKENS, keep_logits=True)
    assert second.generation.token_ids == first.generation.token_ids
    assert len(second.generation.step_logits) == len(first.generation.step_logits)
    for a, b in zip(first.generation.step_logits, second.generation.step_logits, strict=True):
        assert torch.equal(a, b)
    assert second.kv_bytes == first.kv_bytes == kv_bytes
    assert second.kv_bytes_peak == first.kv_bytes_peak


def test_the_file_is_plain_data(loaded, ids, tmp_path):
    """weights_only=True reads it: no class of the harness is pickled."""
    method = _method(loaded, "kivi:group_size=16:residual=16")
    compressed = compress_context(loaded, None, method, 0.3, ids[0])
    path = tmp_path / "kivi.pt"
    stored_context.save_context(
        path, compressed.cache, compressed.last_logits, stored_context.identity(loaded, method, 0.3)
    )
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == stored_context.FORMAT and payload["version"] == stored_context.VERSION
    assert payload["method"] == "kivi:group_size=16:residual=16" and payload["context_length"] == CONTEXT
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def _stored(loaded, ids, path, spec="snapkv", budget=0.4):
    method = _method(loaded, spec)
    compressed = compress_context(loaded, None, method, budget, ids[0])
    ident = stored_context.identity(loaded, method, budget)
    stored_context.save_context(path, compressed.cache, compressed.last_logits, ident)
    return method


def test_another_model_another_format_or_a_corrupt_file_is_one_line(loaded, ids, tmp_path):
    path = tmp_path / "snap.pt"
    method = _stored(loaded, ids, path)
    other = LoadedModel(
        "other",
        "memory:other",
        tiny_model("llama-gqa", layers=2, seed=5, vocab=len(loaded.tokenizer)),
        loaded.tokenizer,
        torch.device("cpu"),
        torch.float32,
    )
    with pytest.raises(KVBenchError, match="stored from another model") as error:
        stored_context.check_identity(stored_context.read_context(path), other, method)
    assert "\n" not in str(error.value)
    with pytest.raises(KVBenchError, match="compressed by snapkv, not streaming_llm"):
        stored_context.check_identity(stored_context.read_context(path), loaded, get_method("streaming_llm"))

    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    with pytest.raises(KVBenchError, match="format version 99, this kvbench reads version 1"):
        stored_context.read_context(old)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(KVBenchError, match="corrupt or not a stored context") as error:
        stored_context.read_context(corrupt)
    assert "\n" not in str(error.value)
    torch.save({"artifacts": {}}, tmp_path / "calibration.pt")
    with pytest.raises(KVBenchError, match="not a kvbench stored context"):
        stored_context.read_context(tmp_path / "calibration.pt")


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_saves_then_answers_a_new_question_from_the_file(capsys, tiny_model_dir, tmp_path):
    path = tmp_path / "stored" / "ctx.pt"
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    common = ["--model", tiny_model_dir, "--max-new-tokens", "6", "--json"]
    code, out, err = _cli(
        capsys, "generate", *common, "--method", "snapkv", "--budget", "0.5", "--prompt", prompt,
        "--question", "Who jumps?", "--save-cache", str(path),
    )  # fmt: skip
    assert code == 0, err
    saved = json.loads(out)
    assert path.is_file() and saved["saved_cache"] == str(path)

    code, out, err = _cli(capsys, "generate", *common, "--load-cache", str(path), "--question", "Who jumps?")
    assert code == 0, err
    answered = json.loads(out)
    assert answered["method"] == "snapkv" and answered["budget"] == 0.5
    assert answered["prefill_s"] == 0.0 and answered["context_tokens"] == saved["context_tokens"]
    assert answered["output"] == saved["output"] and answered["new_tokens"] == saved["new_tokens"]
    assert answered["kv_bytes"] == saved["kv_bytes"]

    code, out, err = _cli(capsys, "generate", *common[:-1], "--load-cache", str(path), "--question", "Who sleeps?")
    assert code == 0, err  # a new question, no prompt
    assert f"loaded {path}" in err and "no prefill" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--load-cache", "/no/such/file.pt"], "is not a file"),
        (["--load-cache", "X", "--prompt", "hi"], "not allowed with argument"),
        (["--load-cache", "X", "--save-cache", "Y"], "exclude each other"),
        (["--prompt", "hi", "--budget", "0.5"], "--method is required"),
        (["--prompt", "hi", "--method", "full"], "--budget is required"),
        (["--method", "full", "--budget", "1"], "one of the arguments --prompt --prompt-file is required"),
    ],
)
def test_generate_argument_mistakes_are_one_line(capsys, tmp_path, argv, message):
    argv = [str(tmp_path / "c.pt") if a == "X" else a for a in argv]
    if "--load-cache" in argv and "X" not in argv and "/no/such/file.pt" not in argv:
        (tmp_path / "c.pt").write_bytes(b"")
    (tmp_path / "c.pt").write_bytes(b"")
    code, out, err = _cli(capsys, "generate", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_generate_refuses_a_corrupt_or_foreign_file_in_one_line(capsys, tiny_model_dir, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    code, out, err = _cli(capsys, "generate", "--model", tiny_model_dir, "--load-cache", str(corrupt))
    assert code == 2 and "corrupt or not a stored context" in err and err.count("\n") == 1


AE_OPTIONS = dict(latent_dim=4, tokens=1024, window=256, epochs=2, batch=256)


@pytest.fixture(scope="module")
def checkpoint(loaded, tmp_path_factory):
    from kvbench.harness.cli.train import train_checkpoint

    out = tmp_path_factory.mktemp("ae") / "ae.pt"
    train_checkpoint(get_method("autoencoder", **AE_OPTIONS), loaded, out, say=lambda _: None)
    return out


@pytest.mark.parametrize("latent_bits,budget", [(0, 0.3), (8, 0.15)])
def test_an_autoencoder_context_relinks_its_decoders_from_the_checkpoint(
    loaded, ids, tmp_path, checkpoint, latent_bits, budget
):
    """The decoders are not in the file: they are re-linked from the method's checkpoint, loaded by its label."""
    from kvbench.harness.artifacts.calibration import ensure_calibrated

    context_ids, question_ids = ids
    spec = "autoencoder:" + ":".join(f"{k}={v}" for k, v in AE_OPTIONS.items())
    spec += f":latent_bits={latent_bits}:checkpoint={checkpoint}"
    method = get_method(spec)
    ensure_calibrated(loaded, method)
    compressed = compress_context(loaded, None, method, budget, context_ids)
    assert compressed.cache.kv_bytes() < 0.5 * compressed.kv_bytes_full
    path = tmp_path / "ae-context.pt"
    ident = stored_context.identity(loaded, method, budget)
    stored_context.save_context(path, compressed.cache, compressed.last_logits, ident)
    assert path.stat().st_size < compressed.kv_bytes_full  # no decoder weights, no raw keys in the file
    first = stored_context.answer(
        loaded, method, compressed.cache, compressed.last_logits, question_ids, NEW_TOKENS, keep_logits=True
    )

    stored = stored_context.read_context(path)
    again = get_method(stored["method"])
    cache, logits, _ = stored_context.load_stored(stored, loaded, again, say=lambda _: None)
    assert cache.kv_bytes() == compressed.cache.kv_bytes()
    second = stored_context.answer(loaded, again, cache, logits, question_ids, NEW_TOKENS, keep_logits=True)
    assert second.generation.token_ids == first.generation.token_ids
    for a, b in zip(first.generation.step_logits, second.generation.step_logits, strict=True):
        assert torch.equal(a, b)

    # Without its checkpoint's artifact the context is refused in one line.
    with pytest.raises(KVBenchError, match="artifact"):
        stored_context.check_identity(stored, loaded, get_method(stored["method"]))

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
from kvbench.harness.engine.stored_checks import CHECKSUMS, check_cache, field_checksums
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
    check_cache(cache, logits, stored.payload, loaded, stored.path)  # what load_stored checks too
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
    with pytest.raises(KVBenchError, match="format version 99, this kvbench reads versions 1, 2"):
        stored_context.read_context(old)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(KVBenchError, match="corrupt or not a stored context") as error:
        stored_context.read_context(corrupt)
    assert "\n" not in str(error.value)
    torch.save({"artifacts": {}}, tmp_path / "calibration.pt")
    with pytest.raises(KVBenchError, match="not a kvbench stored context"):
        stored_context.read_context(tmp_path / "calibration.pt")


def _payload(path):
    return torch.load(path, weights_only=True)


def _write(payload: dict, path, sign: bool) -> str:
    """`payload` written as a stored context file: with its checksums recomputed (a well-formed file whose fields
    disagree with each other), or as edited (a byte changed after it was written)."""
    payload = dict(payload)
    if sign:
        payload[CHECKSUMS] = field_checksums(payload)
    torch.save(payload, path)
    return str(path)


def _format_1(payload: dict) -> dict:
    """What kvbench wrote before stored contexts had checksums and a method version."""
    older = {key: value for key, value in payload.items() if key not in (CHECKSUMS, "method_version")}
    return {**older, "version": 1}


def _load(loaded, path, spec="snapkv"):
    stored = stored_context.read_context(path)
    return stored_context.load_stored(stored, loaded, _method(loaded, spec), say=lambda _: None)


def _one_line(refusal) -> str:
    message = str(refusal.value)
    assert "\n" not in message
    return message


def test_a_tampered_context_length_is_refused_naming_it(loaded, ids, tmp_path):
    path = tmp_path / "snap.pt"
    _stored(loaded, ids, path)
    payload = _payload(path)
    payload["context_length"] = CONTEXT + 4
    with pytest.raises(KVBenchError, match=r"is corrupt: context_length differs from the sha256 it was written with"):
        stored_context.read_context(_write(payload, tmp_path / "edited.pt", sign=False))
    # Re-signed, or a format-1 file (no checksums): the layers hold what was compressed, not the recorded length.
    for name, edited, sign in (("signed", payload, True), ("format-1", _format_1(payload), False)):
        with pytest.raises(KVBenchError) as refusal:
            _load(loaded, _write(edited, tmp_path / f"{name}.pt", sign))
        assert f"recorded context length {CONTEXT + 4} but layer 0 holds {CONTEXT} positions" in _one_line(refusal)


def test_lengths_are_checked_against_the_tensors(loaded, ids, tmp_path):
    """Lengths edited consistently (format 1, no checksum to catch it) still disagree with what the prefixes hold:
    a whole-context prefix must reach the recorded end, an evicting one keep no more than the context."""
    for spec, budget, length, says in (
        ("full", 1.0, CONTEXT + 4, f"recorded context length {CONTEXT + 4} but layer 0 holds positions 0 to 95"),
        ("snapkv", 0.4, 20, "recorded context length 20 but layer 0 keeps 38 entries in a KV head"),
    ):
        path = tmp_path / f"{spec}.pt"
        _stored(loaded, ids, path, spec, budget)
        payload = _format_1(_payload(path))
        payload["context_length"] = length
        payload["layers"] = [{**layer, "prefix_length": length} for layer in payload["layers"]]
        with pytest.raises(KVBenchError) as refusal:
            _load(loaded, _write(payload, tmp_path / f"{spec}-edited.pt", sign=False), spec)
        assert says in _one_line(refusal)


def test_a_changed_tensor_byte_is_refused_naming_its_layer(loaded, ids, tmp_path):
    path = tmp_path / "snap.pt"
    _stored(loaded, ids, path)
    payload = _payload(path)
    keys = payload["layers"][1]["prefix"]["fields"]["keys"]
    original = keys.reshape(-1).view(torch.uint8)[:64].numpy().tobytes()
    keys.view(-1).view(torch.uint8)[5] ^= 1
    with pytest.raises(KVBenchError) as refusal:
        stored_context.read_context(_write(payload, tmp_path / "edited.pt", sign=False))
    assert "is corrupt: layers[1] differs from the sha256 it was written with" in _one_line(refusal)

    # The same bit flipped in the file itself, as a disk or a copy would.
    raw = bytearray(path.read_bytes())
    where = raw.find(original)
    assert where > 0 and raw.find(original, where + 1) < 0
    raw[where + 5] ^= 1
    (tmp_path / "flipped.pt").write_bytes(bytes(raw))
    with pytest.raises(KVBenchError) as refusal:
        stored_context.read_context(tmp_path / "flipped.pt")
    assert "is corrupt: layers[1] differs from the sha256" in _one_line(refusal)  # torch.load itself reads it


def test_a_foreign_method_config_is_refused_naming_the_field(loaded, ids, tmp_path):
    path = tmp_path / "snap.pt"
    _stored(loaded, ids, path)  # snapkv's defaults: window 64
    stored = stored_context.read_context(path)
    with pytest.raises(KVBenchError) as refusal:
        stored_context.check_identity(stored, loaded, get_method("snapkv:window=32"))
    assert _one_line(refusal).endswith(
        "was compressed with method config {window: 64, kernel: 5, pooling: 'avg'}; this kvbench builds "
        "snapkv:window=32 as {window: 32, kernel: 5, pooling: 'avg'}: they differ in window (64 vs 32)"
    )
    with pytest.raises(KVBenchError, match=r"was compressed by snapkv, not streaming_llm$"):
        stored_context.check_identity(stored, loaded, get_method("streaming_llm"))

    payload = _payload(path)
    payload["method_version"] = 0
    edited = stored_context.read_context(_write(payload, tmp_path / "older.pt", sign=True))
    with pytest.raises(KVBenchError) as refusal:
        stored_context.check_identity(edited, loaded, get_method("snapkv"))
    assert "compressed by snapkv version 0; this kvbench's snapkv is version 1" in _one_line(refusal)


def test_a_format_1_file_still_loads_and_answers_the_same(loaded, ids, tmp_path):
    context_ids, question_ids = ids
    path = tmp_path / "h2o.pt"
    method = _stored(loaded, ids, path, "h2o:decode_evict=true", 0.4)
    older = _write(_format_1(_payload(path)), tmp_path / "older.pt", sign=False)
    answers = []
    for file in (path, older):
        cache, logits, _ = _load(loaded, file, "h2o:decode_evict=true")
        answers.append(stored_context.answer(loaded, method, cache, logits, question_ids, NEW_TOKENS).generation)
    assert answers[0].token_ids == answers[1].token_ids


def test_layers_heads_and_packed_rows_must_be_the_models(loaded, ids, tmp_path):
    path = tmp_path / "snap.pt"
    _stored(loaded, ids, path)
    payload = _format_1(_payload(path))
    fewer = {**payload, "layers": payload["layers"][:1]}
    with pytest.raises(KVBenchError) as refusal:
        _load(loaded, _write(fewer, tmp_path / "fewer.pt", sign=False))
    assert "it holds 1 layers, tiny has 2" in _one_line(refusal)
    fields = payload["layers"][1]["prefix"]["fields"]
    fields["keys"], fields["values"] = fields["keys"][:1].clone(), fields["values"][:1].clone()
    with pytest.raises(KVBenchError) as refusal:
        _load(loaded, _write(payload, tmp_path / "one-head.pt", sign=False))
    assert "layer 1 holds 1 KV heads, tiny has 2" in _one_line(refusal)

    path = tmp_path / "razor.pt"
    _stored(loaded, ids, path, "razor", 0.7)
    payload = _format_1(_payload(path))
    fields = payload["layers"][1]["prefix"]["fields"]  # a retrieval head beside a compressed one: ragged, packed
    fields["lengths"][0] += 1
    stored = stored_context.read_context(_write(payload, tmp_path / "lengths.pt", sign=False))
    cache, logits = stored_context.rebuild(stored, _razor())  # as load_stored does, razor's probe set by hand
    with pytest.raises(KVBenchError) as refusal:
        check_cache(cache, logits, stored.payload, loaded, stored.path)
    assert "layer 1's prefix does not rebuild" in _one_line(refusal)


def test_sliding_window_layers_hold_their_window_and_nothing_else(tmp_path):
    """A window layer keeps fewer positions than the context on purpose: exactly its window, to the end."""
    from model_zoo import WINDOW, family_model, random_ids

    model = family_model("gemma2")
    gemma = LoadedModel("gemma2", "memory:tiny-gemma2", model, None, torch.device("cpu"), torch.float32)
    context = random_ids(40, seed=1)
    method = get_method("snapkv:window=8")
    compressed = compress_context(gemma, None, method, 0.7, context)
    path = tmp_path / "gemma.pt"
    stored_context.save_context(
        path, compressed.cache, compressed.last_logits, stored_context.identity(gemma, method, 0.7),
        compressed.kv_bytes_full,
    )  # fmt: skip
    cache, _, _ = stored_context.load_stored(stored_context.read_context(path), gemma, method, say=lambda _: None)
    windowed = [layer for layer in cache.layers if layer.prefix.head_lengths()[0] == WINDOW - 1]
    assert windowed and all(layer.first_position == 40 - (WINDOW - 1) for layer in windowed)

    payload = _format_1(_payload(path))
    fields = payload["layers"][0]["prefix"]["fields"]
    assert fields["first_position"] == 40 - (WINDOW - 1)  # layer 0 is a sliding-window layer
    fields["first_position"] = 0
    with pytest.raises(KVBenchError) as refusal:
        _load(gemma, _write(payload, tmp_path / "edited.pt", sign=False), "snapkv:window=8")
    assert "layer 0 holds the last 11 of 40 positions (a sliding window) but starts at 0" in _one_line(refusal)


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


def test_generate_refuses_another_config_or_an_edited_file_in_one_line(capsys, tiny_model_dir, tmp_path):
    path = tmp_path / "ctx.pt"
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    common = ["generate", "--model", tiny_model_dir, "--max-new-tokens", "2"]
    code, _, err = _cli(
        capsys, *common, "--method", "snapkv:window=8", "--budget", "0.5", "--prompt", prompt, "--save-cache", str(path)
    )
    assert code == 0, err
    code, _, err = _cli(capsys, *common, "--load-cache", str(path), "--method", "snapkv:window=4", "--question", "Who?")
    assert code == 2 and err.count("\n") == 1
    assert "--method asks for {window: 4, kernel: 5, pooling: 'avg'}: they differ in window (8 vs 4)" in err

    payload = torch.load(path, weights_only=True)
    payload["context_length"] += 1
    torch.save(payload, path)
    code, _, err = _cli(capsys, *common, "--load-cache", str(path), "--question", "Who?")
    assert code == 2 and err.count("\n") == 1 and "context_length differs from the sha256" in err


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

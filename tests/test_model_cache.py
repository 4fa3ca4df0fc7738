"""The converted-GGUF model cache: a conversion loads the same tensors and tokenizer as the GGUF file itself,
results keep the GGUF's identity, and an unfinished or damaged conversion is never read but redone."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvbench.harness.models import gguf_cache as model_cache
from kvbench.harness.models.gguf_cache import MARKER, converted, is_complete, models_root
from kvbench.harness.models.loading import load_model, save_model
from kvbench.harness.provenance import loaded_fingerprint
from kvbench.harness.runner.sweep import SweepSpec, run_identity
from kvbench.tasks.fingerprint import chat_template_sha256, tokenizer_id, vocab_sha256

TEXT = "the cat saw the hat. The end"


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF with Q8_0 weights and a byte-level BPE vocabulary, written with gguf's writer."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    hidden, layers, heads, kv_heads, ffn = 64, 2, 4, 2, 128
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_chat_template("{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}")

    def tensor(name: str, shape: tuple[int, ...], quantized: bool = True) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quantized:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, data)

    tensor("token_embd.weight", (len(tokens), hidden))
    tensor("output_norm.weight", (hidden,), quantized=False)
    tensor("output.weight", (len(tokens), hidden))
    head = hidden // heads
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), quantized=False)
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), quantized=False)
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * head, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * head, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KVBENCH_NO_MODEL_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def load_fresh(name: str, dtype: str = "float32"):
    """What a new process gets: load_model without this process's memo."""
    return load_model.__wrapped__(name, "cpu", dtype)


def load_direct(name: str, monkeypatch, dtype: str = "float32"):
    with monkeypatch.context() as patch:
        patch.setenv("KVBENCH_NO_MODEL_CACHE", "1")
        return load_fresh(name, dtype)


def entry(gguf: Path, dtype: str = "float32") -> Path:
    return models_root() / f"{hashlib.sha256(gguf.read_bytes()).hexdigest()}-{dtype}"


def assert_same_model(cached, direct) -> None:
    cached_state, direct_state = cached.model.state_dict(), direct.model.state_dict()
    assert cached_state.keys() == direct_state.keys()
    for name, tensor in direct_state.items():
        assert cached_state[name].dtype == tensor.dtype and torch.equal(cached_state[name], tensor), name
    assert cached.tokenizer(TEXT).input_ids == direct.tokenizer(TEXT).input_ids
    for fingerprint in (tokenizer_id, vocab_sha256, chat_template_sha256):
        assert fingerprint(cached.tokenizer) == fingerprint(direct.tokenizer)
    assert cached.eos_token_ids == direct.eos_token_ids and cached.max_length == direct.max_length
    assert cached.model.config._name_or_path == direct.model.config._name_or_path
    assert (cached.source, cached.dtype) == (direct.source, direct.dtype)
    ids = torch.tensor([direct.tokenizer(TEXT).input_ids])
    with torch.no_grad():
        assert torch.equal(cached.model(ids).logits, direct.model(ids).logits)


def never_convert(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("converted again although a finished conversion was in the cache")

    monkeypatch.setattr("kvbench.harness.models.loading._save_plain", refuse)


def test_a_converted_gguf_loads_bit_identical_to_the_gguf_and_keeps_its_identity(cache_dir, tiny_gguf, monkeypatch):
    direct = load_direct(str(tiny_gguf), monkeypatch)
    assert not (cache_dir / "models").exists()  # the bypass writes nothing

    first = load_fresh(str(tiny_gguf))  # converts
    directory = entry(tiny_gguf)
    marker = json.loads((directory / MARKER).read_text())
    assert marker["source_sha256"] == directory.name.removesuffix("-float32") and marker["dtype"] == "float32"
    assert any(name.endswith(".safetensors") for name in marker["files"])
    assert "tokenizer.json" in marker["files"]
    assert [p.name for p in (cache_dir / "models").iterdir() if not p.name.endswith(".lock")] == [directory.name]

    never_convert(monkeypatch)
    second = load_fresh(str(tiny_gguf))  # reads the conversion
    for cached in (first, second):
        assert_same_model(cached, direct)
        assert cached.source == str(tiny_gguf)
        assert loaded_fingerprint(cached) == "sha256:" + marker["source_sha256"]
    spec = SweepSpec(str(tiny_gguf), ["full"], [1.0], ["passkey"], [128], 1, cache_dir / "out", device="cpu")
    assert run_identity(spec)["model_fingerprint"] == "sha256:" + marker["source_sha256"]
    assert "model_source" not in run_identity(spec)  # where the weights lie is provenance, not identity


def test_each_dtype_is_its_own_conversion(cache_dir, tiny_gguf, monkeypatch):
    half = load_fresh(str(tiny_gguf), "bfloat16")
    assert entry(tiny_gguf, "bfloat16").is_dir() and not entry(tiny_gguf).exists()
    assert_same_model(half, load_direct(str(tiny_gguf), monkeypatch, "bfloat16"))


def test_a_changed_gguf_file_is_a_new_conversion(cache_dir, tmp_path, monkeypatch):
    one = write_tiny_gguf(tmp_path / "one.gguf", seed=1)
    load_fresh(str(one))
    other = write_tiny_gguf(tmp_path / "two.gguf", seed=2)
    assert_same_model(load_fresh(str(other)), load_direct(str(other), monkeypatch))
    assert entry(one).is_dir() and entry(other).is_dir() and entry(one) != entry(other)


@pytest.mark.parametrize("damage", ["no_marker", "wrong_source", "old_converter", "truncated", "corrupt_bytes"])
def test_an_unfinished_or_damaged_conversion_is_redone(cache_dir, tiny_gguf, monkeypatch, damage):
    load_fresh(str(tiny_gguf))
    directory = entry(tiny_gguf)
    weights = next(directory.glob("*.safetensors"))
    marker_path = directory / MARKER
    marker = json.loads(marker_path.read_text())
    if damage == "no_marker":  # what an interrupted conversion that was somehow in place would look like
        marker_path.unlink()
    elif damage == "wrong_source":
        marker_path.write_text(json.dumps({**marker, "source_sha256": "0" * 64}))
    elif damage == "old_converter":
        marker_path.write_text(json.dumps({**marker, "versions": {"transformers": "0.0", "gguf": "0.0"}}))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # same size, unreadable header: only loading it can tell
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    assert is_complete(directory, marker["source_sha256"], "float32") == (damage == "corrupt_bytes")

    reloaded = load_fresh(str(tiny_gguf))
    assert is_complete(directory, marker["source_sha256"], "float32")
    assert_same_model(reloaded, load_direct(str(tiny_gguf), monkeypatch))


def test_save_model_saves_a_direct_and_a_cached_gguf_load_alike(cache_dir, tiny_gguf, tmp_path, monkeypatch):
    """A direct GGUF load is marked quantized (and keeps its marks through save_model); a cached one is the plain
    model it holds. Both save as the same plain model."""
    direct, cached = load_direct(str(tiny_gguf), monkeypatch), load_fresh(str(tiny_gguf))
    assert direct.model.hf_quantizer is not None and getattr(cached.model, "hf_quantizer", None) is None
    for label, loaded in (("direct", direct), ("cached", cached)):
        save_model(loaded, tmp_path / label)
        reloaded = load_fresh(str(tmp_path / label))
        state = reloaded.model.state_dict()
        assert all(torch.equal(state[name], tensor) for name, tensor in direct.model.state_dict().items())
    assert direct.model.hf_quantizer is not None


def test_an_unwritable_cache_falls_back_to_the_direct_load(tmp_path, tiny_gguf, monkeypatch, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(blocker))
    monkeypatch.delenv("KVBENCH_NO_MODEL_CACHE", raising=False)
    loaded = load_fresh(str(tiny_gguf))
    assert "model cache not used" in capsys.readouterr().err
    assert_same_model(loaded, load_direct(str(tiny_gguf), monkeypatch))


def fake_convert(calls: list[Path]):
    def convert(directory: Path) -> None:
        calls.append(directory)
        (directory / "weights.bin").write_bytes(b"w" * 100)

    return convert


def test_a_failed_conversion_leaves_nothing_in_place(cache_dir, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf bytes")

    def fail(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"half")
        assert not any(p.name.endswith("-float32") and not p.name.startswith(".") for p in models_root().iterdir())
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        converted(source, "float32", fail)
    assert [p.name for p in models_root().iterdir() if not p.name.endswith(".lock")] == []
    killed = models_root() / f".tmp-{hashlib.sha256(source.read_bytes()).hexdigest()}-float32-killed"
    killed.mkdir()  # what a converter killed mid-way leaves
    (killed / "weights.bin").write_bytes(b"half")
    calls: list[Path] = []
    directory = converted(source, "float32", fake_convert(calls))
    assert len(calls) == 1 and (directory / "weights.bin").read_bytes() == b"w" * 100
    assert not killed.exists()
    assert converted(source, "float32", fake_convert(calls)) == directory and len(calls) == 1


CONCURRENT = """
import sys, time
from pathlib import Path
from kvbench.harness.models.gguf_cache import converted

def convert(directory):
    with open(sys.argv[2], "a") as log:
        log.write("converted\\n")
    for i in range(20):
        (directory / f"part{i}.bin").write_bytes(bytes([i]) * 1000)
        time.sleep(0.02)

directory = converted(sys.argv[1], "float32", convert)
print(sorted(p.read_bytes()[:1] for p in directory.glob("part*.bin")) == [bytes([i]) for i in range(20)])
"""


def test_concurrent_processes_convert_once_and_read_only_finished_conversions(cache_dir, tmp_path):
    source, log = tmp_path / "m.gguf", tmp_path / "log"
    source.write_bytes(b"gguf bytes")
    script = tmp_path / "convert.py"
    script.write_text(CONCURRENT)
    workers = [
        subprocess.Popen([sys.executable, str(script), str(source), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert outputs == ["True"] * 3
    assert log.read_text() == "converted\n"


def test_the_bypass_variable_turns_the_cache_off(monkeypatch):
    for value, enabled in (("1", False), ("true", False), ("0", True), ("", True)):
        monkeypatch.setenv("KVBENCH_NO_MODEL_CACHE", value)
        assert model_cache.cache_enabled() is enabled


@pytest.mark.slow
def test_the_embedded_model_from_the_cache_is_bit_identical_to_its_gguf(cache_dir, monkeypatch):
    direct = load_direct("smollm2-135m", monkeypatch)
    converting = load_fresh("smollm2-135m")
    never_convert(monkeypatch)
    cached = load_fresh("smollm2-135m")
    for loaded in (converting, cached):
        assert_same_model(loaded, direct)
        assert loaded_fingerprint(loaded) == loaded_fingerprint(direct)
        assert loaded_fingerprint(loaded).startswith("sha256:")

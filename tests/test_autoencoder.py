"""The learned KV autoencoder (seed_methods.md (a)): the linear AE reaches the PCA optimum, each context entry is
encoded once, b = 1 is the full cache, latents are honest bytes, checkpoints round-trip."""

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model

import kvbench.methods.autoencoder.method as autoencoder_module
from kvbench.harness.artifacts.calibration import ensure_calibrated
from kvbench.harness.artifacts.training import train_text
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import stored_bytes
from kvbench.harness.cache.quantized_prefix import QuantizedTensor
from kvbench.harness.cli.train import train_checkpoint, training_options
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import TimedObservation, run_cell
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method
from kvbench.methods.autoencoder.method import AutoencoderConfig

# d = 16 on the tiny model: m = 4 keeps a quarter of the channels.
OPTIONS = dict(latent_dim=4, tokens=4096, window=512, epochs=30, batch=256, lr=3e-3)


@pytest.fixture(scope="module")
def loaded():
    tokenizer = build_tasks_tokenizer(chat_template=False)
    model = tiny_model("llama-gqa", layers=2, vocab=len(tokenizer))
    return LoadedModel("tiny", "memory:tiny-llama-gqa", model, tokenizer, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def trained(loaded, tmp_path_factory):
    """One linear AE, trained and written as a checkpoint through `kvbench train`'s code path."""
    method = get_method("autoencoder", **OPTIONS)
    out = tmp_path_factory.mktemp("ae") / "ae.pt"
    summary = train_checkpoint(method, loaded, out, say=lambda _: None)
    return method, out, summary


def kv_of(model, windows):
    """[2, L, H, T, d]: post-RoPE keys and values of the windows, by a plain prefill."""
    observations = [prefill(model, ids, ObservationNeeds()) for ids in windows]
    return torch.stack(
        [
            torch.stack([torch.cat([o.keys[layer] for o in observations], dim=1) for layer in range(2)]),
            torch.stack([torch.cat([o.values[layer] for o in observations], dim=1) for layer in range(2)]),
        ]
    )


def test_linear_autoencoder_is_within_5_percent_of_the_pca_optimum(loaded, trained):
    method, _, summary = trained
    split = train_text(loaded.tokenizer, OPTIONS["tokens"], OPTIONS["window"], 0, 0.1)
    kv = kv_of(loaded.model, split.train)
    m = OPTIONS["latent_dim"]
    w = {name: method.weights[f"m{m}.{name}"] for name in ("encoder_weight", "encoder_bias")}
    w |= {name: method.weights[f"m{m}.{name}"] for name in ("decoder_weight", "decoder_bias")}
    for kind in (0, 1):
        for layer in range(2):
            x = kv[kind, layer]  # [H, T, d]; one AE per layer serves all its KV heads
            pooled = x.reshape(-1, x.shape[-1])
            mean = pooled.mean(dim=0)
            centered = pooled - mean
            _, vectors = torch.linalg.eigh(centered.T @ centered)
            basis = vectors[:, -m:]  # the top-m principal subspace
            pca_mse = (centered - centered @ basis @ basis.T).pow(2).mean().item()
            z = x @ w["encoder_weight"][kind, layer] + w["encoder_bias"][kind, layer]
            ae_mse = (z @ w["decoder_weight"][kind, layer] + w["decoder_bias"][kind, layer] - x).pow(2).mean().item()
            assert pca_mse <= ae_mse * 1.001, "the PCA subspace is the linear optimum"
            assert ae_mse <= 1.05 * pca_mse, f"{'KV'[kind]} layer {layer}: AE {ae_mse:.5g} vs PCA {pca_mse:.5g}"
            assert summary["losses"][f"m={m}"]["train"][f"{'key' if kind == 0 else 'value'}_mse"][layer] == (
                pytest.approx(ae_mse, rel=1e-3)
            )


def test_heldout_losses_are_recorded_per_layer_for_k_and_v(trained):
    method, out, summary = trained
    heldout = summary["losses"]["m=4"]["heldout"]
    for name in ("key_mse", "value_mse", "key_cosine", "value_cosine", "attention_mse", "attention_relative_error"):
        assert len(heldout[name]) == 2 and all(v == v for v in heldout[name])  # per layer, no NaN
    assert all(0.5 < c <= 1.0 for c in heldout["key_cosine"] + heldout["value_cosine"])
    assert all(0 < e < 1 for e in heldout["attention_relative_error"])
    payload = torch.load(out, weights_only=True)
    assert payload["method"] == "autoencoder" and payload["config"]["latent_dim"] == 4
    assert payload["data"]["heldout_offsets"] and not set(payload["data"]["heldout_offsets"]) & set(
        payload["data"]["train_offsets"]
    )
    assert payload["losses"]["m=4"]["train_epochs"][-1] < payload["losses"]["m=4"]["train_epochs"][0]


def test_checkpoint_is_found_by_path_and_gives_the_same_cache(loaded, trained):
    method, out, _ = trained
    again = get_method("autoencoder", checkpoint=str(out), latent_dim=4)
    ensure_calibrated(loaded, again, say=lambda _: None)
    assert again.artifact_fingerprint() == method.artifact_fingerprint()
    observation = prefill(loaded.model, random_ids(300, seed=1), ObservationNeeds())
    for a, b in zip(method.compress(observation, 0.3), again.compress(observation, 0.3), strict=True):
        assert torch.equal(a.materialize().keys, b.materialize().keys)
    other = LoadedModel("tiny", "memory:other", tiny_model("llama-gqa", layers=2, seed=5, vocab=len(loaded.tokenizer)),
                        loaded.tokenizer, torch.device("cpu"), torch.float32)  # fmt: skip
    with pytest.raises(KVBenchError, match="trained on another model") as error:
        ensure_calibrated(other, get_method("autoencoder", checkpoint=str(out)), say=lambda _: None)
    assert "\n" not in str(error.value) and "kvbench train autoencoder --model tiny --out FILE" in str(error.value)


def test_training_options_are_the_issue_flags():
    options = training_options(
        "autoencoder",
        AutoencoderConfig,
        ["--latent-dim", "8", "--activation", "relu", "--per-head", "--loss", "reconstruction+attention"]
        + ["--tokens", "8192", "--epochs", "3", "--seed", "2", "--text-file", "a.txt", "--text-file", "b.txt"],
    )
    assert options == {
        "latent_dim": 8,
        "activation": "relu",
        "per_head": True,
        "loss": "reconstruction+attention",
        "tokens": 8192,
        "epochs": 3,
        "seed": 2,
        "text_file": ("a.txt", "b.txt"),
    }
    assert "latent_bits" not in get_method("autoencoder").calibration_key()  # a compress-time option


def test_compress_once_never_encodes_a_decoded_vector(loaded, trained, monkeypatch):
    """Decoding 200 tokens calls the encoder only at compression, and only on the cached context vectors."""
    method, _, _ = trained
    context = random_ids(300, seed=2)
    observation = prefill(loaded.model, context, ObservationNeeds())
    encoded, decoding = [], []
    real = autoencoder_module.encode

    def watched(x, *args):
        (decoding if decoding else encoded).append(x)
        return real(x, *args)

    monkeypatch.setattr(autoencoder_module, "encode", watched)
    cache = KVBenchCache(2, method.compress(observation, 0.3), len(context))
    sources = [t.float() for t in observation.keys + observation.values]
    assert len(encoded) == 4 and all(any(torch.equal(x, s) for s in sources) for x in encoded)
    decoding.append("started")
    generation = greedy_decode(
        loaded.model, cache, random_ids(3, seed=3), 200, [], first_logits=observation.last_logits
    )
    assert len(generation.token_ids) == 200
    assert decoding == ["started"], "the encoder ran on a vector while decoding"
    assert all(layer.prefix_length == 300 and layer.tail_length == 3 + 199 for layer in cache.layers)


def test_budget_one_is_the_full_cache(loaded, trained):
    method, _, _ = trained
    context, question = random_ids(300, seed=4), random_ids(4, seed=5)
    observed = TimedObservation(prefill(loaded.model, context, ObservationNeeds()), 0.0)
    full = run_cell(loaded, observed, get_method("full"), 1.0, question, 10, keep_logits=True)
    ours = run_cell(loaded, observed, method, 1.0, question, 10, keep_logits=True)
    assert ours.token_ids == full.token_ids and ours.kv_bytes == full.kv_bytes
    for a, b in zip(ours.step_logits, full.step_logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "budget, bits",
    [(0.5, None), (0.25, 32), (0.13, 16), (0.1, 4), (0.08, 2)],
)
def test_budget_maps_to_latent_width_and_bytes_are_measured(loaded, trained, budget, bits):
    """fp32 cache, d = 16, m = 4: fp32 latents 0.25, fp16 0.125, 8 bits (32 + 32)/512 = 0.125 (a tie: the float
    wins), 4 bits 0.094, 2 bits 0.078; the decoder is method_bytes, never in kv_bytes."""
    method, _, _ = trained
    observation = prefill(loaded.model, random_ids(300, seed=6), ObservationNeeds())
    full = observation.kv_bytes_full()
    prefixes = method.compress(observation, budget)
    kv_bytes = KVBenchCache(2, prefixes, 300).kv_bytes()
    assert kv_bytes <= budget * full
    heads, n, m = 2, 300, 4
    expected = {32: heads * n * m * 4, 16: heads * n * m * 2, 8: heads * n * m + heads * n * 4}
    expected |= {4: heads * n * m // 2 + heads * n * 4, 2: heads * n * m // 4 + heads * n * 4}
    stored = prefixes[0].key_latents
    if bits is None:
        assert kv_bytes == 2 * 2 * heads * n * m * 4  # 0.5 is above every latent width: the widest, fp32
    else:
        assert stored_bytes(stored) == expected[bits]
        assert kv_bytes == 2 * 2 * expected[bits]
    if isinstance(stored, QuantizedTensor):
        codes = stored.unpacked_codes()
        assert int(codes.max()) < (1 << stored.bits) and stored.codes.numel() == heads * n * m * stored.bits // 8
    assert method.method_bytes() == 2 * 2 * (m * 16 + 16) * 4  # K and V decoders of 2 layers, fp32


def test_pinned_8_bit_latents(trained, loaded):
    method, _, _ = trained
    pinned = get_method("autoencoder", latent_dim=4, latent_bits=8)
    pinned.load_calibration(method.weights)
    observation = prefill(loaded.model, random_ids(300, seed=6), ObservationNeeds())
    prefixes = pinned.compress(observation, 0.2)
    assert prefixes[0].key_latents.bits == 8
    assert KVBenchCache(2, prefixes, 300).kv_bytes() == 2 * 2 * (2 * 300 * 4 + 2 * 300 * 4)  # codes + scale, zero
    with pytest.raises(BudgetError, match="lowest reachable budget is 0.13"):
        pinned.compress(observation, 0.1)


def test_unreachable_budget_is_one_line(trained, loaded):
    method, _, _ = trained
    observation = prefill(loaded.model, random_ids(300, seed=7), ObservationNeeds())
    with pytest.raises(BudgetError, match="lowest reachable budget is 0.08") as refusal:
        method.compress(observation, 0.05)
    assert "\n" not in str(refusal.value)


def test_quantized_latents_decode_close_to_the_float_latents(trained, loaded):
    method, _, _ = trained
    observation = prefill(loaded.model, random_ids(300, seed=8), ObservationNeeds())
    exact = method.compress(observation, 0.25)[0].materialize().keys
    errors = [(method.compress(observation, b)[0].materialize().keys - exact).abs().mean() for b in (0.079, 0.1, 0.13)]
    assert errors[0] > errors[1] > errors[2] >= 0


def test_relu_per_head_attention_loss_trains(loaded):
    method = get_method(
        "autoencoder",
        latent_dim=4,
        activation="relu",
        per_head=True,
        loss="reconstruction+attention",
        tokens=1024,
        window=512,
        epochs=2,
        batch=256,
        attention_queries=16,
    )
    trained = method.calibrate(loaded.model, loaded.tokenizer)
    assert tuple(trained.weights["m4.encoder_weight"].shape) == (2, 2, 2, 16, 4)  # K/V, layers, KV heads, d, m
    method.load_calibration(trained.weights)
    observation = prefill(loaded.model, random_ids(200, seed=9), ObservationNeeds())
    prefix = method.compress(observation, 0.25)[0]
    assert float(prefix.key_latents.min()) >= 0  # relu latents
    assert len(trained.losses["m=4"]["heldout"]["attention_mse"]) == 2


def test_decoded_tokens_are_encoded_once_as_they_age_past_the_raw_window(loaded, trained):
    """While decoding, every step leaves fewer than decode_window + 32 raw tokens; each chunk encoded holds exactly
    the oldest raw keys and values of that moment, as latents x·W + b of the trained encoder (computed here from
    the weights), never re-encoded later; the context's latents never change and every fed token stays covered."""
    method, _, _ = trained
    streaming = get_method("autoencoder", **OPTIONS, decode_window=40)
    streaming.load_calibration(method.weights)
    context = random_ids(300, seed=2)
    observation = prefill(loaded.model, context, ObservationNeeds())
    prefixes = streaming.compress(observation, 0.3)
    assert (prefixes.decode_state.window, prefixes.decode_state.chunk) == (40, 32)
    context_latents = [p.key_latents.clone() if isinstance(p.key_latents, torch.Tensor) else None for p in prefixes]
    cache = KVBenchCache(2, prefixes, len(context))
    m = OPTIONS["latent_dim"]
    weight, bias = method.weights[f"m{m}.encoder_weight"], method.weights[f"m{m}.encoder_bias"]
    chunks = []

    def step(cache, index):
        before = [
            (torch.cat([layer.prefix.key_residual, layer.keys[0]], 1), len(layer.prefix.key_blocks))
            for layer in cache.layers
        ]
        streaming.on_decode_step(cache, index)
        for number, (layer, (raw_keys, blocks)) in enumerate(zip(cache.layers, before, strict=True)):
            prefix = layer.prefix
            assert prefix.key_residual.shape[1] + layer.tail_length < 40 + 32
            assert prefix.head_lengths()[0] + layer.tail_length == len(context) + 3 + index + 1
            if len(prefix.key_blocks) > blocks:
                aged = raw_keys.shape[1] - 40
                expected = raw_keys[:, :aged].float() @ weight[0, number] + bias[0, number]
                stored = prefix.key_blocks[-1]
                stored = stored if isinstance(stored, torch.Tensor) else stored.dequantize()
                assert stored.shape[1] == aged
                assert torch.allclose(stored.float().reshape(expected.shape), expected, atol=2e-2, rtol=1e-2)
                assert torch.equal(prefix.key_residual, raw_keys[:, aged:])
                chunks.append(aged)

    greedy_decode(
        loaded.model, cache, random_ids(3, seed=3), 120, [], first_logits=observation.last_logits, step_hook=step
    )
    assert chunks == [32, 32, 32, 32]  # 72 raw tokens at step 68, then 104: one chunk per layer each
    for layer, latents in zip(cache.layers, context_latents, strict=True):
        if latents is not None:
            assert torch.equal(layer.prefix.key_latents, latents)
    assert all(len(layer.prefix.key_blocks) == 2 for layer in cache.layers)

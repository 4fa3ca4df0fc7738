"""KIVI (reference_methods.md §9): packed integer codes, the quantizer's error bound, the spec's byte formula."""

import math

import pytest
import torch
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import stored_bytes
from kvbench.harness.cache.quantized_prefix import (
    QuantizedPrefix,
    dequantize_per_channel,
    dequantize_per_token,
    pack_codes,
    quantize_per_channel,
    quantize_per_token,
    unpack_codes,
)
from kvbench.harness.engine.pipeline import TimedObservation, run_cell
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method


def kv(heads=2, n=2048, dim=64, dtype=torch.float16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(heads, n, dim, generator=generator)
    keys[:, :, 3] *= 20  # an outlier channel, as real keys have: per-channel groups are what keeps it cheap
    values = torch.randn(heads, n, dim, generator=generator)
    return keys.to(dtype), values.to(dtype)


def observation(layers=2, **shape):
    pairs = [kv(seed=layer, **shape) for layer in range(layers)]
    n = pairs[0][0].shape[1]
    return Observation(
        input_ids=torch.zeros(n, dtype=torch.long),
        keys=[k for k, _ in pairs],
        values=[v for _, v in pairs],
        scaling=0.125,
        last_logits=torch.zeros(8),
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_are_integers_in_range_and_packed(bits):
    codes = torch.randint(0, 1 << bits, (3, 37), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).reshape(3, 37), codes)

    keys, _ = kv(n=256)
    quantized = quantize_per_channel(keys, bits, 32)
    unpacked = quantized.unpacked_codes()
    assert unpacked.dtype == torch.uint8 and int(unpacked.max()) < (1 << bits)
    assert int(unpacked.max()) == (1 << bits) - 1 and int(unpacked.min()) == 0  # min-max: both ends used
    # Stored: the packed codes (bits/8 bytes per element) plus an fp16 scale and minimum per group, nothing else.
    assert quantized.codes.numel() == keys.numel() * bits // 8
    assert stored_bytes(quantized) == keys.numel() * bits // 8 + 2 * 2 * keys.numel() // 32


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantized_error_is_within_half_a_step(bits, dtype):
    keys, values = kv(n=256, dtype=dtype)
    for quantize, dequantize, x in [
        (quantize_per_channel, dequantize_per_channel, keys),
        (quantize_per_token, dequantize_per_token, values),
    ]:
        quantized = quantize(x, bits, 32)
        error = (dequantize(quantized).float() - x.float()).abs()
        # the step of each element's group, laid out like x
        scale = quantized.scale.float().expand(quantized.shape)
        if quantize is quantize_per_channel:
            scale = scale.transpose(-1, -2).reshape(x.shape)
        else:
            scale = scale.reshape(x.shape)
        # fp16 output rounds once more, by at most half an fp16 ulp of the value
        slack = 1e-6 + (x.float().abs() * 2**-11 if dtype == torch.float16 else 0)
        assert bool((error <= scale / 2 * (1 + 1e-5) + slack).all())


def test_keys_group_per_channel_and_values_per_token():
    keys, values = kv(heads=2, n=256, dim=64)
    prefix = QuantizedPrefix(keys, values, 2, 2, 32, 32, 256, 128)
    assert tuple(prefix.key_codes.scale.shape) == (2, 256 // 32, 64, 1)  # one (s, min) per channel per 32 tokens
    assert tuple(prefix.value_codes.scale.shape) == (2, 128, 64 // 32, 1)  # one per token per 32 channels
    assert prefix.key_codes.scale.dtype == prefix.value_codes.minimum.dtype == torch.float16
    assert torch.equal(prefix.value_residual, values[:, 128:])  # the recent values stay exact
    assert prefix.head_lengths() == [256, 256]


@pytest.mark.parametrize("bits", [2, 4])
def test_measured_ratio_matches_the_spec_formula(bits):
    """Per element bits + 32/G bits of metadata against 16 (fp16 cache): keys of a context that is a multiple of R
    are all quantized, values all but the last R, which stay fp16."""
    n, r, g = 2048, 128, 32
    obs = observation(n=n)
    method = get_method("kivi", key_bits=bits, value_bits=bits, fill_budget=False)
    cache = KVBenchCache(obs.num_layers, method.compress(obs, 0.99), n)
    per_element = (bits + 32 / g) / 16
    expected = (n * per_element + (n - r) * per_element + r) / (2 * n)
    assert cache.kv_bytes() / obs.kv_bytes_full() == pytest.approx(expected, rel=1e-12)
    # the large-N limits the spec names: 0.1875 at 2 bits, 0.3125 at 4 bits
    key_bytes = sum(stored_bytes(layer.prefix.key_codes) for layer in cache.layers)
    assert key_bytes / (obs.kv_bytes_full() / 2) == {2: 0.1875, 4: 0.3125}[bits]


@pytest.mark.parametrize("budget", [0.22, 0.25, 0.34, 0.5, 0.6, 0.9])
def test_budget_is_a_ceiling_filled_from_below(budget):
    obs = observation(n=2048)
    cache = KVBenchCache(obs.num_layers, get_method("kivi").compress(obs, budget), 2048)
    ratio = cache.kv_bytes() / obs.kv_bytes_full()
    assert budget - 0.01 <= ratio <= budget


def test_budget_picks_the_widest_codes_that_fit():
    kivi = get_method("kivi")
    # fp16 cache, SmolLM2's shape at 2k: with the paper's window 2 bits cost 0.213, 4 bits 0.334, 8 bits 0.590
    assert kivi.plan(2048, 3, 64, 2, 30, 0.25).key_bits == 2
    assert kivi.plan(2048, 3, 64, 2, 30, 0.34).key_bits == 4
    assert kivi.plan(2048, 3, 64, 2, 30, 0.6).key_bits == 8
    assert kivi.plan(2048, 3, 64, 2, 30, 1.0).key_quantized == 0


def test_unreachable_budget_is_one_line_naming_the_lowest():
    with pytest.raises(BudgetError) as refusal:
        get_method("kivi").compress(observation(n=2048), 0.1)
    message = str(refusal.value)
    assert "lowest reachable budget is 0.22" in message and "\n" not in message
    with pytest.raises(BudgetError, match="lowest reachable budget is 1"):
        get_method("kivi").compress(observation(n=100), 0.9)  # shorter than R: everything stays raw


def test_budget_one_is_the_raw_cache():
    obs = observation(n=300, dtype=torch.float32)
    prefixes = get_method("kivi").compress(obs, 1.0)
    assert sum(stored_bytes(p) for p in prefixes) == obs.kv_bytes_full()
    for prefix, keys, values in zip(prefixes, obs.keys, obs.values, strict=True):
        out = prefix.materialize()
        assert torch.equal(out.keys, keys) and torch.equal(out.values, values)


def test_decoding_never_requantizes_the_context():
    """The codes written at compression are the codes after a decode: attention dequantizes transiently."""
    model = tiny_model("llama-gqa", layers=2)
    loaded = LoadedModel("tiny", "memory:tiny", model, None, torch.device("cpu"), torch.float32)
    context = random_ids(300, seed=3)
    observed = TimedObservation(prefill(model, context, ObservationNeeds()), 0.0)
    method = get_method("kivi", key_bits=4, value_bits=4)
    prefixes = method.compress(observed.observation, 0.5)
    before = [(p.key_codes.codes.clone(), p.value_codes.codes.clone(), p.key_codes.scale.clone()) for p in prefixes]
    cache = KVBenchCache(len(prefixes), prefixes, len(context))
    from kvbench.harness.engine.decode import greedy_decode

    greedy_decode(model, cache, random_ids(4, seed=4), 12, [], first_logits=observed.observation.last_logits)
    for layer, (key_codes, value_codes, scale) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.prefix.key_codes.codes, key_codes)
        assert torch.equal(layer.prefix.value_codes.codes, value_codes)
        assert torch.equal(layer.prefix.key_codes.scale, scale)
    # and more bits answer closer to the full cache
    full = run_cell(loaded, observed, get_method("full"), 1.0, random_ids(4, seed=4), 6, keep_logits=True)
    errors = []
    for bits in (2, 8):
        cell = run_cell(
            loaded, observed, get_method("kivi", key_bits=bits, value_bits=bits, fill_budget=False), 0.9,
            random_ids(4, seed=4), 6, keep_logits=True,
        )  # fmt: skip
        errors.append((cell.step_logits[0] - full.step_logits[0]).abs().max().item())
    assert errors[1] < errors[0]


def _within_half_a_step_per_channel(raw: torch.Tensor, restored: torch.Tensor, bits: int, group: int) -> bool:
    """Independent check of keys quantized per channel in groups of `group` tokens: every element within half a
    step, s = (max − min)/(2^bits − 1), of its group's range (plus fp16 rounding of s and min)."""
    h, n, d = raw.shape
    grouped = raw.float().reshape(h, n // group, group, d)
    step = (grouped.amax(dim=2, keepdim=True) - grouped.amin(dim=2, keepdim=True)) / ((1 << bits) - 1)
    error = (restored.float().reshape(h, n // group, group, d) - grouped).abs()
    return bool((error <= step / 2 * 1.01 + 1e-3).all())


def test_decoded_tokens_stream_into_the_quantized_cache_as_they_age():
    """KIVI's decoding: after every step the raw keys are fewer than the key window + R and the raw values fewer
    than the value window + G; each block quantized while decoding holds exactly the oldest raw tokens of that
    moment (within half a step of each, per channel for keys), the raw rest is kept exactly, the context's codes
    never change, and every fed token stays covered (positions continue)."""
    from kvbench.harness.engine.decode import greedy_decode

    model = tiny_model("llama-gqa", layers=2)
    context = random_ids(300, seed=3)
    observed = prefill(model, context, ObservationNeeds())
    method = get_method("kivi", key_bits=4, value_bits=4, residual=32, group_size=16, fill_budget=False)
    prefixes = method.compress(observed, 0.5)
    stream = prefixes.decode_state
    assert (stream.key_window, stream.block, stream.value_window, stream.chunk) == (0, 32, 32, 16)
    context_codes = [p.key_codes.codes.clone() for p in prefixes]
    cache = KVBenchCache(len(prefixes), prefixes, len(context))
    blocks_seen = []

    def step(cache, index):
        before = [
            (torch.cat([layer.prefix.key_residual, layer.keys[0]], 1), len(layer.prefix.key_blocks))
            for layer in cache.layers
        ]
        method.on_decode_step(cache, index)
        for layer, (raw_keys, blocks) in zip(cache.layers, before, strict=True):
            prefix = layer.prefix
            raw_now = prefix.key_residual.shape[1] + layer.tail_length
            assert raw_now < stream.key_window + stream.block
            assert prefix.value_residual.shape[1] + layer.tail_length < stream.value_window + stream.chunk
            assert prefix.head_lengths()[0] + layer.tail_length == len(context) + 3 + index + 1
            if len(prefix.key_blocks) > blocks:
                block = dequantize_per_channel(prefix.key_blocks[-1])
                assert block.shape[1] == 32
                assert _within_half_a_step_per_channel(raw_keys[:, :32], block, 4, 16)
                assert torch.equal(prefix.key_residual, raw_keys[:, 32:])
                blocks_seen.append(index)

    greedy_decode(model, cache, random_ids(3, seed=4), 80, [], first_logits=observed.last_logits, step_hook=step)
    assert len(blocks_seen) == 2 * 2  # 300 mod 32 = 12 raw keys + 83 fed: two blocks per layer
    for layer, codes in zip(cache.layers, context_codes, strict=True):
        assert torch.equal(layer.prefix.key_codes.codes, codes)


def test_budget_one_never_quantizes_while_decoding():
    obs = observation(n=300, dtype=torch.float32)
    assert get_method("kivi").compress(obs, 1.0).decode_state is None

"""kvbench's attention over compressed caches (issue 32) against a direct computation from the definitions.

The reference below shares no code with `kvbench.harness.cache.attention`: for every query head and query row it
lists the keys that row sees (each KV head's own prefix entries at their original positions, then the tail),
computes each logit as q·k·scale, soft-caps it, adds the entry's bias, drops what the causal window hides, adds the
sink's logit to the denominator only, and takes the softmax in float64 with exp and a sum. The attention under
test is driven through the whole seam (`kvbench_attention` with a `KVBenchCache` or a `BatchedCache` of rows, the
tails grown by the cache's own `update`), in both ragged modes (the one-call packed product and the per-head
loop), for uniform, ragged, biased, windowed, capped and sink layers, batched and not. Tolerance: 1e-5 absolute on
fp32 outputs of magnitude ~1 (the reference is float64).

The model-level independent reference of tests/test_attention_reference.py judges ragged and biased prefixes
through batched decoding below as well.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from test_attention_reference import (
    CONTEXT,
    prefilled,
    ragged_counts,
    reference_logits,
    token_prefixes,
)

from kvbench.harness.cache import attention as kv_attention
from kvbench.harness.cache.attention import kvbench_attention, set_ragged_mode
from kvbench.harness.cache.batched import BatchedCache
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import TokenPrefix
from kvbench.harness.engine.batched_decode import DecodeRow, batched_greedy_decode

ATOL = 1e-5
H_Q, H_KV, DIM = 6, 2, 8


@pytest.fixture(autouse=True)
def never_concatenate(monkeypatch):
    """The cases here are short: without this, equal unbiased heads would take the single SDPA call over a
    concatenation that short caches keep (`CONCATENATE_BELOW`), and the no-copy paths would go untested."""
    monkeypatch.setattr(kv_attention, "CONCATENATE_BELOW", 0)


@pytest.fixture(params=["packed", "loop"])
def ragged_mode(request):
    previous = set_ragged_mode(request.param)
    yield request.param
    set_ragged_mode(previous)


class _Layer(torch.nn.Module):
    layer_idx = 0
    is_causal = True
    num_key_value_groups = H_Q // H_KV  # what transformers' SDPA call reads from a real attention module


def reference(query, heads, tail_k, tail_v, tail_positions, scaling, window=None, softcap=None, sinks=None):
    """query [Hq, L, d] at the last L tail positions; heads[h] = (keys [n, d], values [n, d], bias [n] | None,
    positions [n] | None); tail [Hkv, t, d] at `tail_positions`. Output [Hq, L, d] in float64."""
    h_q, length, dim = query.shape
    group = h_q // tail_k.shape[0]
    out = torch.zeros(h_q, length, dim, dtype=torch.float64)
    for qh in range(h_q):
        h = qh // group
        keys, values, bias, positions = heads[h]
        for i in range(length):
            at = int(tail_positions[len(tail_positions) - length + i])
            logits, rows = [], []
            entries = [
                (keys[j], values[j], None if bias is None else float(bias[j]), positions, j) for j in range(len(keys))
            ]
            entries += [(tail_k[h, j], tail_v[h, j], None, tail_positions, j) for j in range(tail_k.shape[1])]
            for key, value, extra, where, j in entries:
                if where is not None:
                    p = int(where[j])
                    if p > at or (window is not None and p <= at - window):
                        continue
                logit = float(query[qh, i].double() @ key.double()) * scaling
                if softcap is not None:
                    logit = softcap * math.tanh(logit / softcap)
                logits.append(logit + (extra or 0.0))
                rows.append(value.double())
            top = max(logits + ([float(sinks[qh])] if sinks is not None else []))
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights) + (math.exp(float(sinks[qh]) - top) if sinks is not None else 0.0)
            out[qh, i] = sum(w * v for w, v in zip(weights, rows, strict=True)) / total
    return out


def _row(generator, lengths, bias=False, tail=2, first_position=None, context=None):
    """A cache row: a prefix with `lengths` entries per KV head, its reference heads, and an earlier tail."""
    keys = [torch.randn(n, DIM, generator=generator) for n in lengths]
    values = [torch.randn(n, DIM, generator=generator) for n in lengths]
    biases = [torch.randn(n, generator=generator) for n in lengths] if bias else None
    prefix = TokenPrefix(keys, values, biases, first_position=first_position)
    context = context if context is not None else max(lengths) + 3
    positions = None if first_position is None else torch.arange(first_position, first_position + lengths[0])
    heads = [(keys[h], values[h], None if biases is None else biases[h], positions) for h in range(H_KV)]
    cache = KVBenchCache(1, [prefix], context)
    tail_k, tail_v = (
        torch.randn(1, H_KV, tail, DIM, generator=generator),
        torch.randn(1, H_KV, tail, DIM, generator=generator),
    )
    cache.layers[0].update(tail_k, tail_v)
    return cache, heads


LAYERS = {
    "uniform": dict(lengths=(7, 7)),
    "ragged": dict(lengths=(9, 3)),
    "ragged, one head empty": dict(lengths=(0, 5)),
    "uniform biased": dict(lengths=(6, 6), bias=True),
    "ragged biased": dict(lengths=(4, 11), bias=True),
    "windowed": dict(lengths=(10, 10), first_position=5, context=15, window=6),
    "capped": dict(lengths=(5, 8), softcap=0.7),
    "sinks": dict(lengths=(6, 2), sinks=True),
    "capped, sinks, biased": dict(lengths=(3, 7), bias=True, softcap=0.5, sinks=True),
    "windowed, capped, sinks": dict(lengths=(8, 8), first_position=0, context=8, window=5, softcap=1.0, sinks=True),
}


def check_case(case: str, batched: bool, device="cpu", dtype=torch.float32, atol=ATOL) -> None:
    """One LAYERS case through `kvbench_attention` on `device` in `dtype`, every row against the float64 reference
    computed on the CPU from the same (rounded) tensors."""
    spec = dict(LAYERS[case])
    window, softcap, with_sinks = spec.pop("window", None), spec.pop("softcap", None), spec.pop("sinks", False)
    generator = torch.Generator().manual_seed(sorted(LAYERS).index(case))
    scaling = 0.6
    sinks = torch.randn(H_Q, generator=generator) if with_sinks else None
    count, length = (3, 2) if batched else (1, 3)
    rows = [_row(generator, tail=2 + r, **spec) for r in range(count)]
    query = torch.randn(count, H_Q, length, DIM, generator=generator) * 3
    new_k = torch.randn(count, H_KV, length, DIM, generator=generator)
    new_v = torch.randn(count, H_KV, length, DIM, generator=generator)
    for cache, _ in rows:
        layer = cache.layers[0]
        prefix = layer.prefix
        for name in ("keys", "values", "bias"):
            if getattr(prefix, name) is not None:
                setattr(prefix, name, getattr(prefix, name).to(device, dtype))
        if prefix.lengths is not None:
            prefix.lengths = prefix.lengths.to(device)
        layer.keys, layer.values = layer.keys.to(device, dtype), layer.values.to(device, dtype)
    caches = [cache for cache, _ in rows]
    seam = BatchedCache(caches) if batched else caches[0]
    keys, values = seam.update(new_k.to(device, dtype), new_v.to(device, dtype), 0)  # as the model's module does
    kwargs = dict(sliding_window=window, softcap=softcap, s_aux=None if sinks is None else sinks.to(device, dtype))
    query = query.to(device, dtype)
    with torch.inference_mode():
        out, _ = kvbench_attention(_Layer(), query, keys, values, None, scaling, kvbench_cache=seam, **kwargs)
    assert out.shape == (count, length, H_Q, DIM)
    for b, (cache, heads) in enumerate(rows):
        layer = cache.layers[0]
        prefix = layer.prefix.attention_inputs()
        sizes = prefix.lengths.tolist() if prefix.lengths is not None else None

        def split(t, sizes=sizes):
            return t.cpu().float().split(sizes) if sizes is not None else t.cpu().float()

        stored_k, stored_v = split(prefix.keys), split(prefix.values)
        stored_b = split(prefix.bias) if prefix.bias is not None else [None] * H_KV
        rounded = [(stored_k[h], stored_v[h], stored_b[h], heads[h][3]) for h in range(H_KV)]
        tail_positions = torch.arange(layer.prefix_length, layer.prefix_length + layer.tail_length)
        expected = reference(
            query[b].cpu().float(),
            rounded,
            layer.keys[0].cpu().float(),
            layer.values[0].cpu().float(),
            tail_positions,
            scaling,
            window,
            softcap,
            None if sinks is None else kwargs["s_aux"].cpu().float(),
        )
        torch.testing.assert_close(out[b].transpose(0, 1).cpu().double(), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_attention_equals_the_direct_computation(case, batched, ragged_mode):
    check_case(case, batched)


def test_the_window_really_hides_prefix_entries():
    """The windowed case is not vacuous: without the window the reference answers differently."""
    generator = torch.Generator().manual_seed(3)
    (cache, heads) = _row(generator, (10, 10), False, 2, first_position=5, context=15)
    layer = cache.layers[0]
    positions = torch.arange(layer.prefix_length, layer.prefix_length + layer.tail_length)
    query = torch.randn(H_Q, 1, DIM, generator=generator) * 3
    windowed = reference(query, heads, layer.keys[0], layer.values[0], positions, 0.6, window=6)
    plain = reference(query, heads, layer.keys[0], layer.values[0], positions, 0.6)
    assert (windowed - plain).abs().max() > 100 * ATOL


def test_ragged_rows_decode_in_a_batch_as_the_model_level_reference(ragged_mode):
    """Rows with ragged (copies) and ragged merged (bias ln c) prefixes decode together; every row's every step
    equals tests/test_attention_reference.py's count-weighted forward over its full sequence."""
    model, context, question, observation = prefilled("qwen2-gqa", seed=30)
    patterns = [ragged_counts(model, CONTEXT, seed=31), ragged_counts(model, CONTEXT, seed=32)]
    patterns[1] = [c * (1 + (torch.arange(CONTEXT) % 3 == 0).long()) for c in patterns[1]]
    prefixes = [token_prefixes(observation, patterns[0], as_bias=False), token_prefixes(observation, patterns[1], True)]
    assert all(p.lengths is not None for layers in prefixes for p in layers)
    rows = [DecodeRow(KVBenchCache(observation.num_layers, p, CONTEXT), question, 5) for p in prefixes]
    decoded = batched_greedy_decode(model, rows, [], keep_logits=True)
    first = CONTEXT + len(question) - 1
    for counts, row in zip(patterns, decoded, strict=True):
        tokens = row.generation.token_ids
        expected = reference_logits(model, context + question + tokens[:-1], counts)
        for step, ours in enumerate(row.generation.step_logits):
            torch.testing.assert_close(ours, expected[first + step], rtol=0, atol=ATOL)


def test_packed_and_loop_modes_are_both_exercised(monkeypatch):
    """The mode switch reaches the code: each mode calls its own function, `auto` is the loop on the CPU."""
    called = []
    for name in ("_attend_packed", "_attend_loop"):
        original = getattr(kv_attention, name)
        monkeypatch.setattr(kv_attention, name, lambda *a, _f=original, _n=name: called.append(_n) or _f(*a))
    generator = torch.Generator().manual_seed(4)
    for mode in ("packed", "loop", "auto"):
        cache, _ = _row(generator, (4, 6), False, 2)
        previous = set_ragged_mode(mode)
        try:
            with torch.inference_mode():
                query = torch.randn(1, H_Q, 1, DIM)
                keys, values = cache.update(torch.randn(1, H_KV, 1, DIM), torch.randn(1, H_KV, 1, DIM), 0)
                kvbench_attention(_Layer(), query, keys, values, None, 0.5, kvbench_cache=cache)
        finally:
            set_ragged_mode(previous)
    assert called == ["_attend_packed", "_attend_loop", "_attend_loop"]
    with pytest.raises(ValueError, match="ragged attention mode"):
        set_ragged_mode("varlen")


def test_the_tail_grows_in_place_and_the_prefix_is_never_copied():
    """A decode step writes its key into reserved room (the tail's storage stays put) and attention reads the
    prefix's own storage: no step allocates anything the size of the context (ragged heads: the compressed path)."""
    generator = torch.Generator().manual_seed(5)
    cache, _ = _row(generator, (40, 39), False, 0, context=40)
    layer = cache.layers[0]
    cache.reserve(6)
    seen = []
    original = kv_attention.attend_compressed

    def spy(query, tail_k, tail_v, prefix, *args, **kwargs):
        seen.append((prefix.keys.data_ptr(), tail_k.untyped_storage().data_ptr()))
        return original(query, tail_k, tail_v, prefix, *args, **kwargs)

    kv_attention.attend_compressed = spy
    try:
        with torch.inference_mode():
            for step in range(6):
                new = torch.randn(1, H_KV, 1, DIM, generator=generator)
                keys, values = cache.update(new, new * 2, 0)
                query = torch.randn(1, H_Q, 1, DIM)
                kvbench_attention(_Layer(), query, keys, values, None, 0.5, kvbench_cache=cache)
                assert torch.equal(layer.keys[:, :, step], new[:, :, 0]) and layer.tail_length == step + 1
    finally:
        kv_attention.attend_compressed = original
    assert len(seen) == 6 and {prefix for prefix, _ in seen} == {layer.prefix.keys.data_ptr()}
    assert len({tail for _, tail in seen}) == 1  # one room for all six steps
    assert cache.held_bytes() == cache.kv_bytes() + 2 * H_KV * 6 * DIM * 4  # the tokens held, not the room


def test_a_joined_prefix_is_copied_once_and_read_with_its_tail_where_they_lie():
    """Equal-length unbiased heads (`full`, uniform evictions): the first update copies the prefix into the head of
    the tail's room, once; every step's single SDPA call then reads prefix and tail as one view of that room (the
    same storage at every step, never a concatenation), and the output equals the float64 reference. kv_bytes
    counts the prefix's own tokens, not the room; the tokens decoded are counted in held_bytes only."""
    generator = torch.Generator().manual_seed(6)
    cache, heads = _row(generator, (40, 40), False, 0, context=40)
    layer = cache.layers[0]
    prefix_bytes = cache.kv_bytes()
    assert prefix_bytes == 2 * H_KV * 40 * DIM * 4
    cache.reserve(6)
    seen = []
    original = kv_attention._sdpa_over_prefix

    def spy(module, query, key, value, prefix_length, *args):
        seen.append((key.untyped_storage().data_ptr(), value.untyped_storage().data_ptr(), key.shape[2]))
        return original(module, query, key, value, prefix_length, *args)

    kv_attention._sdpa_over_prefix = spy
    tail_k, tail_v = [], []
    try:
        with torch.inference_mode():
            for step in range(6):
                new_k, new_v = torch.randn(2, 1, H_KV, 1, DIM, generator=generator)
                tail_k.append(new_k)
                tail_v.append(new_v)
                keys, values = cache.update(new_k, new_v, 0)
                query = torch.randn(1, H_Q, 1, DIM, generator=generator)
                out, _ = kvbench_attention(_Layer(), query, keys, values, None, 0.5, kvbench_cache=cache)
                expected = reference(
                    query[0], heads, torch.cat(tail_k, 2)[0], torch.cat(tail_v, 2)[0], torch.arange(40, 41 + step), 0.5
                )
                assert torch.allclose(out[0].transpose(0, 1).double(), expected, atol=ATOL, rtol=0)
    finally:
        kv_attention._sdpa_over_prefix = original
    assert layer.joined == 40 and [length for _, _, length in seen] == list(range(41, 47))
    assert {(k, v) for k, v, _ in seen} == {
        (layer.prefix.keys.untyped_storage().data_ptr(), layer.prefix.values.untyped_storage().data_ptr())
    }
    assert cache.kv_bytes() == prefix_bytes  # the room's spare and the tail are not the prefix's bytes
    assert cache.held_bytes() == prefix_bytes + 2 * H_KV * 6 * DIM * 4
    cache.reset_tail()  # another question from the same context: the prefix stays, the room stays
    assert layer.joined == 40 and layer.tail_length == 0 and cache.kv_bytes() == prefix_bytes
    assert torch.equal(layer.prefix.keys, torch.stack([h[0] for h in heads]))


def test_the_tail_without_a_reservation_doubles_and_keeps_its_tokens():
    cache = KVBenchCache(1)
    layer = cache.layers[0]
    written = [torch.full((1, 2, 1, 3), float(i)) for i in range(9)]
    for tensor in written:
        cache.update(tensor, -tensor, 0)
    assert layer.tail_length == 9 and torch.equal(layer.keys, torch.cat(written, dim=2))
    assert torch.equal(layer.values, -torch.cat(written, dim=2))
    assert layer._key_room.shape[2] == 16  # 1, 2, 4, 8, 16: amortized, not one copy per token


@pytest.mark.parametrize("kind", ["kivi", "latent"])
def test_decompressed_context_lives_one_layer_at_a_time(kind, monkeypatch):
    """kivi's quantized and the autoencoder's latent prefixes decompress inside each layer's attention and drop it
    on return: whenever a layer decompresses, no other layer's decompressed keys or values are alive (weak
    references to every materialized tensor), so a decode step never holds the whole context in float."""
    from tiny_models import random_ids, tiny_model

    from kvbench.harness.cache.latent_prefix import LatentDecoder, LatentPrefix
    from kvbench.harness.cache.quantized_prefix import QuantizedPrefix
    from kvbench.harness.engine.decode import greedy_decode
    from kvbench.harness.engine.prefill import ObservationNeeds, prefill
    from kvbench.methods import get_method

    model = tiny_model("llama-gqa", layers=3)
    context = random_ids(320, seed=40)
    if kind == "kivi":
        compressor = get_method("kivi", residual=32)
        observation = prefill(model, context, compressor.needs())
        prefixes = compressor.compress(observation, 0.25)
        assert all(p.key_codes is not None and p.value_codes is not None for p in prefixes)
    else:
        observation = prefill(model, context, ObservationNeeds())
        generator = torch.Generator().manual_seed(42)
        h, d, m = observation.num_kv_heads, observation.head_dim, 4

        def decoder():
            return LatentDecoder(torch.randn(1, m, d, generator=generator), torch.randn(1, 1, d, generator=generator))

        prefixes = [
            LatentPrefix(
                torch.randn(h, len(context), m, generator=generator),
                torch.randn(h, len(context), m, generator=generator),
                decoder(),
                decoder(),
                4,
                0,
                torch.float16,
                torch.float32,
            )
            for _ in range(observation.num_layers)
        ]
    cache = KVBenchCache(observation.num_layers, prefixes, len(context))
    prefix_type = QuantizedPrefix if kind == "kivi" else LatentPrefix
    alive: list[weakref.ref] = []
    most = [0]
    original = prefix_type.materialize

    def tracked(self):
        kv = original(self)
        alive[:] = [ref for ref in alive if ref() is not None]
        most[0] = max(most[0], len(alive) // 2 + 1)
        alive.extend([weakref.ref(kv.keys), weakref.ref(kv.values)])
        return kv

    monkeypatch.setattr(prefix_type, "materialize", tracked)
    greedy_decode(model, cache, random_ids(3, seed=41), 4, [])
    assert len(alive) > 0 and most[0] == 1

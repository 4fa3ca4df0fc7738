"""The cache seam: representations, byte accounting, the logit bias, tail handling and the decode hook."""

import math

import torch
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache.attention import attend_compressed
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import LowRankPrefix, PrefixKV, TokenPrefix, stored_bytes
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.methods import get_method


def decode_with(model, observation, prefixes, question, steps=8, hook=None):
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    return greedy_decode(model, cache, question, steps, [], step_hook=hook, keep_logits=True)


def test_ragged_heads_are_packed_without_padding():
    keys = [torch.randn(n, 8) for n in (5, 2, 9)]
    values = [torch.randn(n, 8) for n in (5, 2, 9)]
    prefix = TokenPrefix(keys, values)
    assert prefix.head_lengths() == [5, 2, 9]
    assert prefix.keys.shape == (16, 8)
    assert stored_bytes(prefix) == 2 * 16 * 8 * 4 + 3 * 4  # packed K and V plus int32 lengths
    kv = prefix.materialize()
    assert not kv.uniform and all(torch.equal(a, b) for a, b in zip(kv.keys, keys))


def test_stored_bytes_counts_whole_storages_and_each_once():
    base = torch.zeros(100, 4)
    view = base[:10]
    assert stored_bytes([view]) == 100 * 4 * 4  # a view holds its whole storage
    assert stored_bytes([base, view, {"again": base}]) == 100 * 4 * 4
    prefix = TokenPrefix(view[None], view[None])  # compacted on construction: the dropped rows are freed
    assert stored_bytes(prefix) == 2 * 10 * 4 * 4


def test_bias_of_a_merged_token_equals_repeating_it():
    """A token stored once with bias ln(c) must attend exactly like c copies of it: the merged-token contract."""
    torch.manual_seed(0)
    query, tail_k, tail_v = torch.randn(4, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    keys, values = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    repeated = PrefixKV(
        torch.cat([keys, keys[:, :1].expand(-1, 2, -1)], 1), torch.cat([values, values[:, :1].expand(-1, 2, -1)], 1)
    )
    bias = torch.zeros(2, 6)
    bias[:, 0] = math.log(3)
    merged = PrefixKV(keys, values, bias)
    expected = attend_compressed(query, tail_k, tail_v, repeated, 0.35)
    torch.testing.assert_close(attend_compressed(query, tail_k, tail_v, merged, 0.35), expected)
    ragged = TokenPrefix(list(keys), list(values), list(bias))
    assert ragged.lengths is None  # equal lengths are stored dense
    split = TokenPrefix([keys[0], keys[1, :6]], [values[0], values[1, :6]], [bias[0], bias[1]]).materialize()
    torch.testing.assert_close(attend_compressed(query, tail_k, tail_v, split, 0.35), expected)


def test_ragged_attention_equals_per_head_dense_attention():
    torch.manual_seed(1)
    query, tail_k, tail_v = torch.randn(6, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    keys = [torch.randn(n, 8) for n in (4, 7, 1)]
    values = [torch.randn(n, 8) for n in (4, 7, 1)]
    out = attend_compressed(query, tail_k, tail_v, TokenPrefix(keys, values).materialize(), 0.5)
    for head in range(3):
        single = PrefixKV(keys[head][None], values[head][None])
        rows = slice(2 * head, 2 * head + 2)
        ref = attend_compressed(query[rows], tail_k[head : head + 1], tail_v[head : head + 1], single, 0.5)
        torch.testing.assert_close(out[rows], ref)


def test_low_rank_prefix_at_full_rank_reproduces_full_decoding():
    model = tiny_model("qwen2-gqa")
    observation = prefill(model, random_ids(60, seed=3), ObservationNeeds())
    question = random_ids(4, seed=4)
    full = decode_with(model, observation, get_method("full").compress(observation, 1.0), question)
    d = observation.head_dim
    prefixes = []
    for keys, values in zip(observation.keys, observation.values):
        basis = torch.linalg.qr(torch.randn(keys.shape[0], d, d)).Q  # an orthonormal basis per head
        prefixes.append(LowRankPrefix(keys, values, basis, basis))
    low_rank = decode_with(model, observation, prefixes, question)
    assert low_rank.token_ids == full.token_ids
    for a, b in zip(low_rank.step_logits, full.step_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    half = [
        LowRankPrefix(
            k,
            v,
            torch.eye(d)[None, :, : d // 2].expand(k.shape[0], -1, -1).contiguous(),
            torch.eye(d)[None].expand(k.shape[0], -1, -1).contiguous(),
        )
        for k, v in zip(observation.keys, observation.values)
    ]
    ratio = KVBenchCache(observation.num_layers, half, 60).kv_bytes() / observation.kv_bytes_full()
    assert ratio > 0.75  # codes plus bases are all counted: half-rank keys + full values + two bases


def test_several_questions_reuse_the_compressed_context():
    model = tiny_model("llama-gqa")
    observation = prefill(model, random_ids(70, seed=5), ObservationNeeds(window=64))
    prefixes = get_method("snapkv").compress(observation, 0.5)
    first, second = random_ids(3, seed=6), random_ids(5, seed=7)
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    greedy_decode(model, cache, first, 6, [])
    assert cache.get_seq_length() == 70 + 3 + 5  # positions continue after the original context
    cache.reset_tail()
    assert cache.get_seq_length() == 70
    again = greedy_decode(model, cache, second, 6, [], keep_logits=True)
    fresh = decode_with(model, observation, prefixes, second, steps=6)
    assert again.token_ids == fresh.token_ids


def test_decode_hook_runs_after_every_generated_token():
    model = tiny_model("llama-mha")
    observation = prefill(model, random_ids(30, seed=8), ObservationNeeds())
    seen = []
    decode_with(
        model,
        observation,
        get_method("full").compress(observation, 1.0),
        [5],
        steps=5,
        hook=lambda cache, step: seen.append((step, cache.get_seq_length())),
    )
    assert seen == [(0, 32), (1, 33), (2, 34), (3, 35)]


def test_stop_strings_cut_the_output():
    model = tiny_model("llama-gqa")
    observation = prefill(model, random_ids(30, seed=9), ObservationNeeds())

    class Words:
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(f"t{t}" for t in tokens)

    cache = KVBenchCache(observation.num_layers, get_method("full").compress(observation, 1.0), 30)
    free = greedy_decode(model, cache, [4], 6, [], tokenizer=Words())
    stop = f"t{free.token_ids[2]}"
    cache.reset_tail()
    stopped = greedy_decode(model, cache, [4], 6, [], tokenizer=Words(), stop_strings=[stop])
    assert stopped.stopped_by == "stop_string"
    assert stop not in stopped.text and len(stopped.token_ids) <= 3


def test_head_spread_is_each_heads_length_over_its_layers_mean():
    from kvbench.harness.engine.pipeline import head_spread

    layer_lengths = [(5, 2, 9), (4, 4, 6)]  # means 16/3 and 14/3
    prefixes = [TokenPrefix([torch.randn(n, 8) for n in ns], [torch.randn(n, 8) for n in ns]) for ns in layer_lengths]
    spread = head_spread(KVBenchCache(2, prefixes, 20))
    ratios = sorted([5 * 3 / 16, 2 * 3 / 16, 9 * 3 / 16, 4 * 3 / 14, 4 * 3 / 14, 6 * 3 / 14])
    assert spread == {
        "min": round(ratios[0], 4),
        "median": round((ratios[2] + ratios[3]) / 2, 4),
        "max": round(ratios[-1], 4),
    }
    uniform = [TokenPrefix(torch.randn(3, 6, 8), torch.randn(3, 6, 8)) for _ in range(2)]
    assert head_spread(KVBenchCache(2, uniform, 6)) == {"min": 1.0, "median": 1.0, "max": 1.0}
    assert head_spread(KVBenchCache(2)) is None

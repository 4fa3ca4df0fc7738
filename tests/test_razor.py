"""RazorAttention's defining properties (specs/baselines.md §3, §5), on hand-built attention maps and tiny models."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, random_ids, tiny_model, tiny_tokenizer

from kvbench.harness.cache.attention import attend_compressed
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import PrefixKV
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError
from kvbench.methods.common.head_scores import layer_probe_scores, probe_scores
from kvbench.methods.razor import Razor, head_count, layer_bytes, retrieval_heads

CONTEXT = 400


def spec_masks(length: int, repeats: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The echo and induction masks written out from the spec's definition, entry by entry."""
    n = offset + length * repeats
    echo = torch.zeros(n, n, dtype=torch.bool)
    induction = torch.zeros(n, n, dtype=torch.bool)
    for i in range(offset, n):
        for j in range(offset, i):
            t, s = i - offset, j - offset
            if t >= length and s % length == t % length:
                echo[i, j] = True
                induction[i, j + 1] = True
    return echo, induction


def test_probe_scores_on_hand_built_maps():
    length, repeats, offset = 8, 4, 1
    n = offset + length * repeats
    echo_mask, induction_mask = spec_masks(length, repeats, offset)
    after_previous, previous = torch.zeros(n, n), torch.zeros(n, n)
    for i in range(n):
        back = i - length
        previous[i, back if back >= offset else 0] = 1.0
        after_previous[i, back + 1 if back >= offset else 0] = 1.0
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    echo, induction = probe_scores(torch.stack([after_previous, previous, uniform]), length, repeats, offset)
    # One head on the token after the previous copy hits one induction entry per row: 3S of 6S entries.
    assert induction[0].item() == pytest.approx(0.5) and echo[0].item() == 0
    assert echo[1].item() == pytest.approx(0.5) and induction[1].item() == 0
    assert echo[2].item() == pytest.approx(uniform[echo_mask].mean().item())
    assert induction[2].item() == pytest.approx(uniform[induction_mask].mean().item())


def test_chunked_layer_scores_match_full_attention_maps():
    length, repeats, offset = 80, 4, 1  # 321 tokens: more than one chunk of rows
    n = offset + length * repeats
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(4, n, 8, generator=generator), torch.randn(2, n, 8, generator=generator)
    logits = queries @ keys.repeat_interleave(2, dim=0).transpose(-1, -2) * 0.5
    attention = torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), dim=-1)
    expected = probe_scores(attention, length, repeats, offset)
    for ours, reference in zip(layer_probe_scores(queries, keys, 0.5, length, repeats, offset), expected):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)


def plant_offset_head(model: torch.nn.Module, layer: int, query_head: int, offset: int) -> None:
    """Make one query head attend to the token `offset` positions back, through RoPE alone.

    Every embedding carries the same value in channel 0, so the head's query and key are constant vectors
    before RoPE; choosing their per-pair phases so that all rotation pairs align at distance `offset` gives
    q_i·k_j = c·Σ_m cos(ω_m(i − j − offset)), sharply peaked at i − j = offset.
    """
    attention = model.model.layers[layer].self_attn
    dim = model.config.head_dim
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    angle = -offset * model.model.rotary_emb.inv_freq
    query = torch.cat([angle.cos(), angle.sin()]) * 3
    key = torch.cat([torch.ones(dim // 2), torch.zeros(dim // 2)]) * 3
    kv_head = query_head // group
    attention.q_proj.weight[query_head * dim : (query_head + 1) * dim] = 0
    attention.q_proj.weight[query_head * dim : (query_head + 1) * dim, 0] = query
    attention.k_proj.weight[kv_head * dim : (kv_head + 1) * dim] = 0
    attention.k_proj.weight[kv_head * dim : (kv_head + 1) * dim, 0] = key


@pytest.fixture(scope="module")
def planted():
    """A 3-layer GQA model whose layer 0 has an induction head (KV head 0) and layer 2 an echo head (KV head 1).

    On the probe (period S) the token after the previous copy sits S − 1 back and the copy itself S back.
    Outputs of attention and MLPs are zeroed, so every layer reads the embeddings and keeps channel 0.
    """
    period = 16
    model = tiny_model("llama-gqa", layers=3, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeddings = torch.randn(VOCAB, model.config.hidden_size, generator=generator)
        embeddings[:, 0] = 0
        embeddings = F.normalize(embeddings, dim=-1)
        embeddings[:, 0] = 1
        model.model.embed_tokens.weight.copy_(embeddings)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        plant_offset_head(model, layer=0, query_head=1, offset=period - 1)
        plant_offset_head(model, layer=2, query_head=3, offset=period)
    method = Razor(probe_length=period, induction_fraction=0.2, echo_fraction=0.2)
    return method, method.calibrate(model, tiny_tokenizer())


def test_calibration_finds_the_planted_induction_and_echo_heads(planted):
    method, artifacts = planted
    echo, induction = artifacts["echo"], artifacts["induction"]
    assert echo.shape == induction.shape == (3, 2)
    assert divmod(int(induction.argmax()), 2) == (0, 0) and induction[0, 0] > 0.45 and echo[0, 0] < 0.1
    assert divmod(int(echo.argmax()), 2) == (2, 1) and echo[2, 1] > 0.45 and induction[2, 1] < 0.1
    others = torch.ones(3, 2, dtype=torch.bool)
    others[0, 0] = others[2, 1] = False
    assert induction[others].max() < 0.1 and echo[others].max() < 0.1
    method.load_calibration(artifacts)
    # round(0.2 × 6) = 1 induction head ∪ 1 echo head, found in different layers: a true union.
    assert method.retrieval.nonzero().tolist() == [[0, 0], [2, 1]]


def test_retrieval_heads_are_a_global_union_with_one_rounding_rule():
    assert head_count(0.14, 90) == 13 and head_count(0.01, 90) == 1 and head_count(0.15, 90) == 14
    generator = torch.Generator().manual_seed(0)
    induction = torch.rand(30, 3, generator=generator)
    echo = torch.rand(30, 3, generator=generator) * 0.1
    top_induction = set(induction.flatten().argsort(descending=True)[:13].tolist())
    last_layer_head = next(i for i in range(87, 90) if i not in top_induction)
    echo.view(-1)[last_layer_head] = 1.0  # the best echo head sits in the last layer, outside the induction set
    chosen = retrieval_heads(echo, induction, 0.01, 0.14)
    assert set(chosen.flatten().nonzero().flatten().tolist()) == top_induction | {last_layer_head}


@pytest.fixture(scope="module")
def observation():
    return prefill(tiny_model("llama-gqa", layers=4), random_ids(CONTEXT, seed=11), ObservationNeeds())


def calibrated(**options) -> Razor:
    """Razor with hand-set scores: KV head 0 of layer 1 and KV head 1 of layer 3 are the induction heads."""
    method = Razor(induction_fraction=0.25, echo_fraction=0.0, **options)
    induction = torch.zeros(4, 2)
    induction[1, 0], induction[3, 1] = 1.0, 0.9
    method.load_calibration({"echo": torch.zeros(4, 2), "induction": induction})
    return method


@pytest.mark.parametrize("count_bias", [True, False])
def test_compressed_heads_hold_sinks_one_mean_token_and_a_window(observation, count_bias):
    method, budget = calibrated(count_bias=count_bias), 0.5
    prefixes = method.compress(observation, budget)
    retrieval = method.retrieval
    lengths = {length for prefix in prefixes for length in prefix.head_lengths()} - {CONTEXT}
    (n_kept,) = lengths
    window = n_kept - 4 - 1
    dropped = slice(4, CONTEXT - window)
    for layer, prefix in enumerate(prefixes):
        kv = prefix.materialize()
        for head in range(2):
            keys, values = observation.keys[layer][head], observation.values[layer][head]
            bias = kv.bias[head] if kv.bias is not None else None
            if retrieval[layer, head]:
                assert torch.equal(kv.keys[head], keys) and torch.equal(kv.values[head], values)
                assert bias is None or not bias.any()
                continue
            expected_keys = torch.cat([keys[:4], keys[dropped].mean(0, keepdim=True), keys[CONTEXT - window :]])
            expected_values = torch.cat([values[:4], values[dropped].mean(0, keepdim=True), values[CONTEXT - window :]])
            torch.testing.assert_close(kv.keys[head], expected_keys)
            torch.testing.assert_close(kv.values[head], expected_values)
            if count_bias:
                expected_bias = torch.zeros(n_kept)
                expected_bias[4] = math.log(CONTEXT - window - 4)
                torch.testing.assert_close(bias, expected_bias)
            else:
                assert bias is None
        if retrieval[layer].any():
            assert prefix.lengths is not None  # mixed layers are stored ragged, not padded
    # The window is the largest whose measured bytes stay within the budget.
    kv_bytes = KVBenchCache(observation.num_layers, prefixes, CONTEXT).kv_bytes()
    full = observation.kv_bytes_full()
    assert kv_bytes == layer_bytes(observation, retrieval, n_kept, count_bias) <= budget * full
    assert layer_bytes(observation, retrieval, n_kept + 1, count_bias) > budget * full


def test_compensation_token_attends_like_the_tokens_it_replaces(observation):
    prefixes = calibrated().compress(observation, 0.4)
    kv = prefixes[0].materialize()
    keys, values, bias = kv.keys[0], kv.values[0], kv.bias[0]
    copies = round(math.exp(bias[4].item()))
    expanded = PrefixKV(
        torch.cat([keys[:4], keys[4:5].expand(copies, -1), keys[5:]])[None],
        torch.cat([values[:4], values[4:5].expand(copies, -1), values[5:]])[None],
    )
    merged = PrefixKV(keys[None], values[None], bias[None])
    query = torch.randn(2, 3, keys.shape[-1], generator=torch.Generator().manual_seed(0))
    tail = torch.randn(1, 3, keys.shape[-1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        attend_compressed(query, tail, tail, merged, 0.25), attend_compressed(query, tail, tail, expanded, 0.25)
    )


def test_refuses_budgets_below_the_lowest_reachable_one(observation):
    method = calibrated()
    for budget in (0.1, 0.25):  # 2 of 8 KV heads are kept whole: b ≤ 0.25 cannot be met
        with pytest.raises(BudgetError, match="lowest reachable budget is") as refusal:
            method.compress(observation, budget)
        assert "\n" not in str(refusal.value)
    lowest = float(re.search(r"lowest reachable budget is ([0-9.]+)", str(refusal.value)).group(1))
    assert 0.25 < lowest < 0.3
    prefixes = method.compress(observation, lowest)
    assert KVBenchCache(observation.num_layers, prefixes, CONTEXT).kv_bytes() <= lowest * observation.kv_bytes_full()

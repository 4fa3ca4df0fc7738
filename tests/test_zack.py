"""ZACK's defining properties (specs/baselines.md §1): orthonormal calibrated bases, a planted low-rank key space
recovered at its rank, full rank equal to full decoding, ranks by global energy, bytes (bases included) on budget;
the paper's prefill projecting every layer's keys and values before attention reads them, and the ablation that
projects a finished exact prefill."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import LowRankPrefix, stored_bytes
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import TimedObservation, run_cell
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method
from kvbench.methods.zack import ZACK, allocate_ranks, lowest_budget

CONTEXT = 400
# Projecting a finished exact prefill: the mode whose compress works from a shared observation.
SMALL_CALIBRATION = dict(calibration_samples=2, calibration_tokens=512, project_during_prefill=False)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tasks_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama-gqa", layers=3, vocab=len(tokenizer))


@pytest.fixture(scope="module")
def calibrated(model, tokenizer):
    """r_min = 2: the tiny model's heads have d = 16, where the paper's floor of 8 channels is half a head."""
    method = ZACK(**SMALL_CALIBRATION, r_min=2)
    method.load_calibration(method.calibrate(model, tokenizer))
    return method


@pytest.fixture(scope="module")
def paper(calibrated):
    """The paper's mode (the default) with the same bases: the calibration does not depend on the mode."""
    method = ZACK(**{**SMALL_CALIBRATION, "project_during_prefill": True}, r_min=2)
    assert method.calibration_key() == calibrated.calibration_key()
    method.load_calibration(calibrated.artifacts)
    return method


@pytest.fixture(scope="module")
def observation(model):
    return prefill(model, random_ids(CONTEXT, seed=11), ObservationNeeds())


def decode(model, observation, prefixes, steps=8):
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    return greedy_decode(model, cache, random_ids(5, seed=12), steps, [], keep_logits=True)


def ratio(observation, prefixes):
    return KVBenchCache(observation.num_layers, prefixes, observation.context_length).kv_bytes() / (
        observation.kv_bytes_full()
    )


def test_calibrated_bases_are_orthonormal_with_sorted_energy(calibrated, observation):
    d = observation.head_dim
    for name in ("key", "value"):
        bases, energy = calibrated.artifacts[f"{name}_bases"], calibrated.artifacts[f"{name}_energy"]
        assert bases.shape == (observation.num_layers, observation.num_kv_heads, d, d)
        identity = torch.eye(d).expand_as(bases)
        torch.testing.assert_close(bases.transpose(-1, -2) @ bases, identity, rtol=0, atol=1e-5)
        torch.testing.assert_close(energy.sum(-1), torch.ones(energy.shape[:2]))
        assert (energy[..., :-1] >= energy[..., 1:]).all()


def plant_low_rank_queries_and_keys(model, layer, kept_channels):
    """Zero every q/k output channel of `layer` but the kept ones: post-RoPE Q and K then live in their span,
    since RoPE only rotates channel i with channel i + d/2 (both kept)."""
    attention = model.model.layers[layer].self_attn
    d = attention.head_dim
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj):
            rows = projection.weight.view(-1, d, projection.weight.shape[-1])
            dropped = [c for c in range(d) if c not in kept_channels]
            rows[:, dropped] = 0


def test_planted_low_rank_key_space_is_recovered_with_a_small_rank(tokenizer):
    model = tiny_model("llama-gqa", layers=3, vocab=len(tokenizer), seed=1)
    d = model.config.hidden_size // model.config.num_attention_heads
    planted = [0, 1, d // 2, d // 2 + 1]
    plant_low_rank_queries_and_keys(model, 0, planted)
    method = ZACK(**SMALL_CALIBRATION, r_min=2)
    method.load_calibration(method.calibrate(model, tokenizer))
    energy, bases = method.artifacts["key_energy"][0], method.artifacts["key_bases"][0]
    assert (energy[:, 4:].sum(-1) < 1e-6).all()
    outside = [c for c in range(d) if c not in planted]
    assert bases[:, outside, :4].abs().max() < 1e-4  # the first 4 axes span exactly the planted channels

    observation = prefill(model, random_ids(CONTEXT, seed=3), ObservationNeeds())
    prefixes = method.compress(observation, 0.5)
    planted_ranks = [codes.shape[-1] for codes in prefixes[0].key_codes]
    other_ranks = [codes.shape[-1] for prefix in prefixes[1:] for codes in prefix.key_codes]
    assert planted_ranks == [4] * observation.num_kv_heads  # no channel spent on the empty directions
    assert min(other_ranks) > 4
    torch.testing.assert_close(prefixes[0].materialize().keys, observation.keys[0], rtol=0, atol=1e-4)


def test_full_rank_bases_reproduce_full_decoding(model, calibrated, observation):
    """Projected after RoPE with the calibrated d×d bases (codes and bases stored), attention equals full."""
    full = decode(model, observation, get_method("full").compress(observation, 1.0))
    artifacts = calibrated.artifacts
    prefixes = [
        LowRankPrefix(keys, values, list(artifacts["key_bases"][layer]), list(artifacts["value_bases"][layer]))
        for layer, (keys, values) in enumerate(zip(observation.keys, observation.values))
    ]
    d, h = observation.head_dim, observation.num_kv_heads
    assert stored_bytes(prefixes[0]) == 2 * h * (CONTEXT * d + d * d) * 4
    low_rank = decode(model, observation, prefixes)
    assert low_rank.token_ids == full.token_ids
    for ours, reference in zip(low_rank.step_logits, full.step_logits, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_budget_one_keeps_raw_channels_without_bases(model, calibrated, observation):
    prefixes = calibrated.compress(observation, 1.0)
    assert all(basis is None for prefix in prefixes for basis in prefix.key_basis + prefix.value_basis)
    assert ratio(observation, prefixes) == 1.0
    full = decode(model, observation, get_method("full").compress(observation, 1.0))
    ours = decode(model, observation, prefixes)
    assert ours.token_ids == full.token_ids
    assert all(torch.equal(a, b) for a, b in zip(ours.step_logits, full.step_logits, strict=True))


@pytest.mark.parametrize("context", [40, CONTEXT])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_measured_bytes_with_bases_meet_the_budget(model, calibrated, context, budget):
    observation = prefill(model, random_ids(context, seed=5), ObservationNeeds())
    if budget < lowest_budget(context, observation.head_dim, 2):  # b = 0.1 < 2/16 + 2/N
        with pytest.raises(BudgetError, match=f"budget {budget:g} is unreachable on this {context}-token context"):
            calibrated.compress(observation, budget)
        return
    prefixes = calibrated.compress(observation, budget)
    assert budget - 0.02 <= ratio(observation, prefixes) <= budget
    d = observation.head_dim
    for prefix in prefixes:
        expected = sum(
            (context * d if basis is None else (context + d) * basis.shape[1]) * 4
            for basis in prefix.key_basis + prefix.value_basis
        )
        assert stored_bytes(prefix) == expected  # codes and bases, nothing padded


def test_ranks_differ_per_head_and_are_stored_unpadded(calibrated, observation):
    prefixes = calibrated.compress(observation, 0.5)
    ranks = [[codes.shape[-1] for codes in prefix.key_codes] for prefix in prefixes]
    assert len({rank for layer in ranks for rank in layer}) > 1
    for prefix in prefixes:
        for codes, basis in zip(prefix.key_codes, prefix.key_basis):
            assert codes.shape == (CONTEXT, basis.shape[1]) and basis.shape[0] == observation.head_dim


def test_a_context_too_short_for_the_bases_is_refused(model, calibrated):
    """At N tokens a rank-2 head costs 2·(N + d) elements against N·d for the full head: b ≥ 2/d + 2/N."""
    observation = prefill(model, random_ids(12, seed=6), ObservationNeeds())
    with pytest.raises(BudgetError, match="lowest reachable budget is 0.3") as refusal:
        calibrated.compress(observation, 0.25)
    assert "\n" not in str(refusal.value)
    assert ratio(observation, calibrated.compress(observation, 1.0)) == 1.0


def test_budgets_below_the_rank_floor_are_refused(model, tokenizer, observation):
    """specs/baselines.md §1: b < r_min/d is infeasible. d = 16, r_min = 8: b >= 8/16 + 8/400 = 0.52."""
    method = ZACK(**SMALL_CALIBRATION)
    method.load_calibration(method.calibrate(model, tokenizer))
    assert lowest_budget(CONTEXT, 16, 8) == pytest.approx(0.52)
    with pytest.raises(
        BudgetError, match="budget 0.5 is unreachable on this 400-token context; the lowest reachable budget is 0.52"
    ):
        method.compress(observation, 0.5)
    assert 0.5 <= ratio(observation, method.compress(observation, 0.53)) <= 0.53


def test_greedy_allocation_follows_normalised_energy():
    d, n = 16, 400
    concentrated = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (d - 3))
    flat = torch.full((d,), 1 / d)
    energy = torch.stack([concentrated, flat])
    # floor 2 for both, then 6 channels: the concentrated head's third (0.2) and five flat ones (1/16 each)
    assert allocate_ranks(energy, (2 * 2 + 6) * (n + d), n, r_min=2) == [3, 7]
    # r_min = 8 cannot be paid for both heads with 10 channels' worth of elements: refused, never lowered
    with pytest.raises(BudgetError, match="needs b >= 0.52"):
        allocate_ranks(energy, 10 * (n + d), n, r_min=8)


def test_heads_at_a_rank_costing_the_raw_head_are_stored_raw():
    """At N = 40, d = 16, rank 12 with its basis costs 56·12 > 40·16: the head keeps its raw channels instead."""
    d, n = 16, 40
    energy = torch.stack([torch.full((d,), 1 / d), torch.tensor([1.0] + [0.0] * (d - 1))])
    ranks = allocate_ranks(energy, n * d + 2 * (n + d), n, r_min=2)
    assert ranks == [d, 2]


def test_compress_without_calibration_is_one_line(observation):
    with pytest.raises(KVBenchError, match="kvbench calibrate zack"):
        ZACK().compress(observation, 0.5)


def test_the_paper_mode_is_the_default():
    assert ZACK().config.project_during_prefill
    assert ZACK().needs().own_prefill and not ZACK(project_during_prefill=False).needs().own_prefill


def test_paper_mode_prefills_itself_below_budget_one_only(model, paper, calibrated):
    assert paper.prefills_itself(model.config, CONTEXT, 0.5)
    assert not paper.prefills_itself(model.config, CONTEXT, 1.0)  # nothing is projected at b = 1
    assert not any(calibrated.prefills_itself(model.config, CONTEXT, b) for b in (0.25, 0.5, 1.0))


def test_paper_mode_refuses_to_compress_a_finished_prefill(paper, observation):
    with pytest.raises(RuntimeError, match="prefill_and_compress"):
        paper.compress(observation, 0.5)
    prefixes = paper.compress(observation, 1.0)  # b = 1: raw heads, the shared prefill is the paper's
    assert all(basis is None for prefix in prefixes for basis in prefix.key_basis + prefix.value_basis)


@pytest.fixture(scope="module")
def paper_cache(model, paper):
    return paper.prefill_and_compress(model, random_ids(CONTEXT, seed=11), 0.5)


def test_errors_compound_through_the_layers_in_the_paper_mode(calibrated, observation, paper_cache):
    """Layer 0 reads the exact embeddings, so both modes store the same codes there; from layer 1 on, the paper's
    inputs carry the projected attention of the layers below and the codes differ, at the same ranks and bytes."""
    cache, _ = paper_cache
    exact = calibrated.compress(observation, 0.5)
    ours = [layer.prefix for layer in cache.layers]
    assert any(basis is not None for basis in exact[0].key_basis + exact[0].value_basis)  # layer 0 is projected
    for name in ("key", "value"):
        for a, b in zip(getattr(ours[0], f"{name}_codes"), getattr(exact[0], f"{name}_codes"), strict=True):
            assert torch.equal(a, b)
    for layer in range(1, len(ours)):
        for name in ("key", "value"):
            codes = getattr(ours[layer], f"{name}_codes")
            reference = getattr(exact[layer], f"{name}_codes")
            assert [c.shape for c in codes] == [c.shape for c in reference]
            assert max((a - b).abs().max().item() for a, b in zip(codes, reference)) > 1e-3
    assert cache.kv_bytes() == KVBenchCache(len(exact), exact, CONTEXT).kv_bytes()
    assert all(layer.tail_length == 0 for layer in cache.layers)


def restored(codes, basis):
    return torch.stack([c if b is None else c @ b.T for c, b in zip(codes, basis)])


def reference_projected_forward(model, ids, prefixes):
    """The tiny Llama run by hand, each layer's attention over its keys/values projected onto the stored bases and
    reconstructed (K·B·Bᵀ): each layer's codes and the last position's logits."""
    inner = model.model
    config = model.config
    n, d = len(ids), config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    hidden = inner.embed_tokens(torch.tensor([ids]))
    cos, sin = inner.rotary_emb(hidden, torch.arange(n)[None])
    codes = []
    for block, prefix in zip(inner.layers, prefixes, strict=True):
        attention = block.self_attn
        x = block.input_layernorm(hidden)
        q, k, v = (
            proj(x).view(1, n, -1, d).transpose(1, 2) for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        key_codes = [k[0, h] if b is None else k[0, h] @ b for h, b in enumerate(prefix.key_basis)]
        value_codes = [v[0, h] if b is None else v[0, h] @ b for h, b in enumerate(prefix.value_basis)]
        k_hat = restored(key_codes, prefix.key_basis).repeat_interleave(group, dim=0)[None]
        v_hat = restored(value_codes, prefix.value_basis).repeat_interleave(group, dim=0)[None]
        out = F.scaled_dot_product_attention(q, k_hat, v_hat, is_causal=True, scale=attention.scaling)
        hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(1, n, -1))
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        codes.append((key_codes, value_codes))
    return codes, model.lm_head(inner.norm(hidden))[0, -1]


@torch.inference_mode()
def test_paper_codes_are_what_the_model_computes_over_reconstructed_keys_and_values(model, paper, paper_cache):
    cache, logits = paper_cache
    prefixes = [layer.prefix for layer in cache.layers]
    artifacts = paper.artifacts
    for layer, prefix in enumerate(prefixes):  # the stored bases are the calibrated ones, first r columns
        for name, bases in (("key", prefix.key_basis), ("value", prefix.value_basis)):
            for head, basis in enumerate(bases):
                if basis is not None:
                    expected = artifacts[f"{name}_bases"][layer, head, :, : basis.shape[1]]
                    assert torch.equal(basis, expected)
    reference, reference_logits = reference_projected_forward(model, random_ids(CONTEXT, seed=11), prefixes)
    for prefix, (key_codes, value_codes) in zip(prefixes, reference, strict=True):
        for ours, theirs in zip(prefix.key_codes + prefix.value_codes, key_codes + value_codes, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)


def test_exact_prefill_mode_keeps_its_previous_result(calibrated, observation):
    """project_during_prefill=False is kvbench's earlier ZACK: ranks by global energy over the finished prefill's
    keys and values, each head projected onto the first r calibrated axes (stored raw at full rank)."""
    artifacts, n, d = calibrated.artifacts, CONTEXT, observation.head_dim
    h = observation.num_kv_heads
    capacity = int(0.5 * observation.num_layers * h * n * d)
    expected = []
    for name in ("key", "value"):
        ranks = allocate_ranks(artifacts[f"{name}_energy"].flatten(0, 1), capacity, n, r_min=2)
        expected.append(
            [
                [
                    None if r == d else artifacts[f"{name}_bases"][layer, head, :, :r]
                    for head, r in enumerate(ranks[layer * h : (layer + 1) * h])
                ]
                for layer in range(observation.num_layers)
            ]
        )
    prefixes = calibrated.compress(observation, 0.5)
    for layer, prefix in enumerate(prefixes):
        previous = LowRankPrefix(
            observation.keys[layer], observation.values[layer], expected[0][layer], expected[1][layer]
        )
        for a, b in zip(prefix.key_codes + prefix.value_codes, previous.key_codes + previous.value_codes, strict=True):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def loaded(model, tokenizer):
    return LoadedModel("tiny", "memory:tiny-llama-gqa", model, tokenizer, torch.device("cpu"), torch.float32)


def answer(loaded, observed, method, budget):
    ids = random_ids(CONTEXT, seed=11)
    return run_cell(loaded, observed, method, budget, random_ids(5, seed=12), 8, keep_logits=True, context_ids=ids)


def test_exact_prefill_mode_shares_the_prefill(loaded, calibrated, observation):
    shared = answer(loaded, TimedObservation(observation, 0.0), calibrated, 0.5)
    own = answer(loaded, None, calibrated, 0.5)
    assert shared.token_ids == own.token_ids and shared.kv_bytes == own.kv_bytes
    assert all(torch.equal(a, b) for a, b in zip(shared.step_logits, own.step_logits, strict=True))


def test_paper_mode_answers_through_the_pipeline(loaded, paper, calibrated, observation):
    ours = answer(loaded, None, paper, 0.5)
    exact = answer(loaded, TimedObservation(observation, 0.0), calibrated, 0.5)
    assert ours.kv_bytes == exact.kv_bytes and 0.48 <= ours.kv_ratio <= 0.5
    assert not torch.allclose(ours.step_logits[0], exact.step_logits[0])
    again = answer(loaded, None, paper, 0.5)
    assert again.token_ids == ours.token_ids
    assert all(torch.equal(a, b) for a, b in zip(again.step_logits, ours.step_logits, strict=True))

"""ZACK's defining properties (specs/baselines.md §1): orthonormal calibrated bases, a planted low-rank key space
recovered at its rank, full rank equal to full decoding, ranks by global energy, bytes (bases included) on budget."""

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache import KVBenchCache
from kvbench.harness.decode import greedy_decode
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.prefill import ObservationNeeds, prefill
from kvbench.harness.prefix import LowRankPrefix, stored_bytes
from kvbench.methods import get_method
from kvbench.methods.zack import ZACK, allocate_ranks, lowest_budget

CONTEXT = 400
SMALL_CALIBRATION = dict(calibration_samples=2, calibration_tokens=512)


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

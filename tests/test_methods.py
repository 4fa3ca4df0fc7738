"""Defining properties of the reference methods (specs/reference_methods.md), on tiny random models.

The contract every registered method must meet is in test_method_contract.py."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError, KVBenchError, UnknownNameError
from kvbench.methods import REGISTRY, get_method, list_methods, load_all
from kvbench.methods.adakv_snapkv import adaptive_head_indices
from kvbench.methods.pyramidkv import pyramid_budgets

load_all()
METHODS = sorted(REGISTRY)
REFERENCE_METHODS = {"full", "random", "streaming_llm", "knorm", "snapkv", "pyramidkv", "adakv_snapkv"}
CONTEXT = 400


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa", layers=4)


@pytest.fixture(scope="module")
def observation(model):
    """One prefill with everything any method may ask for."""
    needs = ObservationNeeds(window=128, column_sums=True, hidden_states=True)
    return prefill(model, random_ids(CONTEXT, seed=11), needs)


def kept_keys(prefix, head):
    kv = prefix.materialize()
    return kv.keys[head]


def kept_positions(observation, layer, prefix, head):
    """Recover kept token positions by matching stored keys to the observed keys (keys are distinct)."""
    keys = kept_keys(prefix, head)
    full = observation.keys[layer][head]
    matches = (keys[:, None, :] == full[None, :, :]).all(-1)
    assert (matches.sum(-1) == 1).all()
    return matches.float().argmax(-1).tolist()


def test_registry_lists_reference_methods():
    names = {name for name, _, _ in list_methods()}
    assert REFERENCE_METHODS <= names
    for _, family, description in list_methods():
        assert family and description and "\n" not in description


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(UnknownNameError, match="valid methods: .*snapkv"):
        get_method("snapkvv")


def test_unknown_option_is_a_user_error():
    with pytest.raises(KVBenchError, match="window"):
        get_method("snapkv", windw=3)


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), "x"])
def test_budget_outside_unit_interval_is_refused(observation, budget):
    with pytest.raises(BudgetError):
        get_method("knorm").compress(observation, budget)


def test_full_keeps_everything(observation):
    prefixes = get_method("full").compress(observation, 0.1)
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    assert cache.kv_bytes() == observation.kv_bytes_full()


def test_adakv_heads_hold_different_numbers_of_tokens(observation):
    budget = 0.25
    n_kept = int(CONTEXT * budget)
    prefixes = get_method("adakv_snapkv").compress(observation, budget)
    ragged = False
    for prefix in prefixes:
        lengths = prefix.head_lengths()
        assert sum(lengths) == observation.num_kv_heads * n_kept
        assert min(lengths) >= int(n_kept * 0.2)
        ragged |= len(set(lengths)) > 1
        assert prefix.lengths is not None or len(set(lengths)) == 1  # ragged heads are packed, not padded
    assert ragged


def test_adakv_safeguard_and_global_topk():
    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0.1, 0.2, 0.3, 0.0, 0.05, 0.01]])
    kept = adaptive_head_indices(scores, n_kept=3, alpha=0.34)
    assert sorted(kept[1].tolist()) == [2]  # its safeguarded best token survives the global ranking
    assert sorted(kept[0].tolist()) == [0, 1, 2, 3, 4]
    no_safeguard = adaptive_head_indices(scores, n_kept=3, alpha=0.0)
    assert no_safeguard[1].numel() == 0


def test_streaming_llm_keeps_sinks_and_recent(observation):
    budget = 0.25
    n_kept = int(CONTEXT * budget)
    prefixes = get_method("streaming_llm").compress(observation, budget)
    expected = list(range(4)) + list(range(CONTEXT - (n_kept - 4), CONTEXT))
    for layer, prefix in enumerate(prefixes):
        for head in range(observation.num_kv_heads):
            assert kept_positions(observation, layer, prefix, head) == expected


def test_streaming_llm_refuses_a_budget_below_its_sinks(observation):
    with pytest.raises(BudgetError, match="sink"):
        get_method("streaming_llm").compress(observation, 3 / CONTEXT)


def test_knorm_keeps_the_smallest_key_norms(observation):
    prefixes = get_method("knorm").compress(observation, 0.1)
    n_kept = int(CONTEXT * 0.1)
    for layer, prefix in enumerate(prefixes):
        for head in range(observation.num_kv_heads):
            norms = observation.keys[layer][head].norm(dim=-1)
            expected = sorted(norms.topk(n_kept, largest=False).indices.tolist())
            assert kept_positions(observation, layer, prefix, head) == expected


def random_kept(observation, sample_seed, **options):
    """Kept positions per layer and head when the harness gives the sample `sample_seed`."""
    sample = dataclasses.replace(observation, seed=sample_seed)
    prefixes = get_method("random", **options).compress(sample, 0.25)
    return [
        [kept_positions(observation, layer, prefix, head) for head in range(observation.num_kv_heads)]
        for layer, prefix in enumerate(prefixes)
    ]


def test_random_draws_from_the_sample_seed_the_config_seed_and_the_layer(observation):
    first = random_kept(observation, 7)
    assert random_kept(observation, 7) == first  # same run seed and sample: the same tokens
    assert random_kept(observation, 8) != first  # another sample or run seed: others
    assert random_kept(observation, 7, seed=1) != first  # the config's seed offsets the draw
    assert all(len(set(map(tuple, layer))) > 1 for layer in first)  # heads draw apart
    assert len({tuple(layer[0]) for layer in first}) == observation.num_layers  # and so do layers


def eager_attention(model, ids):
    """Attention probabilities from transformers' eager path: an independent reference for scores."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return [a[0] for a in out.attentions]  # per layer [H_q, N, N]


def test_snapkv_matches_independent_scoring(model, observation):
    window, kernel, budget = 32, 5, 0.25
    n_kept = int(CONTEXT * budget)
    attentions = eager_attention(model, observation.input_ids.tolist())
    prefixes = get_method("snapkv", window=window).compress(observation, budget)
    h_kv = observation.num_kv_heads
    for layer, prefix in enumerate(prefixes):
        scores = attentions[layer][:, -window:, : CONTEXT - window].mean(dim=1)
        scores = F.avg_pool1d(scores[:, None], kernel, padding=kernel // 2, stride=1)[:, 0]
        scores = scores.reshape(h_kv, -1, scores.shape[-1]).mean(dim=1)
        for head in range(h_kv):
            top = scores[head].topk(n_kept - window).indices.tolist()
            expected = sorted(top + list(range(CONTEXT - window, CONTEXT)))
            assert kept_positions(observation, layer, prefix, head) == expected


def _memoized_cells_equal_unmemoized(observation, methods, calls: list):
    """Compress every (method, budget) from one shared observation (the scorer, logging each layer it computes
    into `calls`, runs once per layer), then each from a fresh copy: equal prefixes."""
    shared = dataclasses.replace(observation)  # a fresh memo
    cells = [(method, budget) for method in methods for budget in (0.5, 0.25, 0.1)]
    memoized = [method.compress(shared, budget) for method, budget in cells]
    assert sorted(calls) == list(range(observation.num_layers))
    alone = [method.compress(dataclasses.replace(observation), budget) for method, budget in cells]
    for prefixes, references in zip(memoized, alone, strict=True):
        for ours, reference in zip(prefixes, references, strict=True):
            for field in ("keys", "values"):
                mine, theirs = getattr(ours.materialize(), field), getattr(reference.materialize(), field)
                if isinstance(mine, torch.Tensor):  # uniform heads; ragged heads (adakv) are one tensor per head
                    mine, theirs = [mine], [theirs]
                assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    return shared


def test_snapkv_scores_are_computed_once_per_prefill_and_unchanged(observation, monkeypatch):
    """The cells of one prefill share SnapKV's window scores (memoized on the observation): pyramidkv and snapkv at
    three budgets score each layer once, and every prefix equals the one compressed from an unmemoized copy."""
    import kvbench.methods.common.eviction as eviction

    calls = []
    original = eviction.window_attention
    monkeypatch.setattr(eviction, "window_attention", lambda *a: calls.append(a[1]) or original(*a))
    methods = [get_method("snapkv", window=32), get_method("pyramidkv", window=32)]
    _memoized_cells_equal_unmemoized(observation, methods, calls)


def test_expected_attention_scores_are_computed_once_per_prefill_and_unchanged(observation, monkeypatch):
    """expected_attention and adakv over it at three budgets share one computation of each layer's scores (memoized
    on the observation), every prefix equals an unmemoized copy's, and another config is its own entry."""
    import kvbench.methods.expected_attention as ea

    calls = []
    original = ea._expected_attention_scores
    monkeypatch.setattr(ea, "_expected_attention_scores", lambda *a: calls.append(a[1]) or original(*a))
    methods = [get_method("expected_attention"), get_method("adakv", base="expected_attention")]
    shared = _memoized_cells_equal_unmemoized(observation, methods, calls)
    calls.clear()
    other = ea.ExpectedAttentionConfig(n_future_positions=7)
    ea.expected_attention_scores(shared, 0, other, 1)  # another config is another entry, not a stale hit
    ea.expected_attention_scores(shared, 0, other, 5)
    assert calls == [0]


def test_column_sums_match_eager_attention(model, observation):
    attentions = eager_attention(model, observation.input_ids.tolist())
    for layer in range(observation.num_layers):
        torch.testing.assert_close(observation.column_sums[layer], attentions[layer].sum(dim=1), rtol=1e-4, atol=1e-4)


def test_hidden_states_are_each_layers_input(model, observation):
    with torch.no_grad():
        out = model(observation.input_ids[None], output_hidden_states=True)
    for layer in range(observation.num_layers):
        torch.testing.assert_close(observation.hidden_states[layer], out.hidden_states[layer][0])


def test_pyramid_budgets_follow_the_formula():
    budgets = pyramid_budgets(4000, 0.5, 30, window=64, beta=20)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 30 - 2000) <= 1
    min_num = 2000 / 20
    assert budgets[-1] == round(min_num) and budgets[0] == round(2 * 2000 - min_num)
    # min_num = 1000/20 < window: kvpress falls back to uniform round(N·b)
    assert pyramid_budgets(4000, 0.25, 30, 64, 20) == [1000] * 30
    assert pyramid_budgets(4000, 1.0, 30, 64, 20) == [4000] * 30


def test_pyramidkv_layers_keep_pyramid_budgets(observation):
    prefixes = get_method("pyramidkv", window=8).compress(observation, 0.5)
    expected = pyramid_budgets(CONTEXT, 0.5, observation.num_layers, 8, 20)
    assert len(set(expected)) == observation.num_layers
    assert [p.head_lengths()[0] for p in prefixes] == expected

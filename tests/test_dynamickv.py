"""DynamicKV's defining properties (specs/baselines.md §2) on a 30-layer tiny model (30 % 4 != 0, like SmolLM2):
layer budgets sum to the total, the forced final reallocation, caches that only shrink, per-head top-k + window."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError
from kvbench.methods.dynamickv import DynamicKV, dynamickv_scores, progressive_orders, reallocate

CONTEXT = 400
LAYERS = 30
WINDOW = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa", layers=LAYERS)


@pytest.fixture(scope="module")
def observation(model):
    return prefill(model, random_ids(CONTEXT, seed=11), ObservationNeeds(window=WINDOW))


@pytest.fixture(scope="module")
def scores(observation):
    config = DynamicKV().config
    return [dynamickv_scores(observation, layer, config) for layer in range(LAYERS)]


def test_reallocation_uses_the_global_top_k_and_the_full_layer_count():
    first = torch.tensor([[0.9, 0.8, 0.1, 0.1]])
    second = torch.tensor([[0.7, 0.05, 0.05, 0.05]])
    # global top 2·1·2 = 4 entries: three from the first layer, one from the second
    assert reallocate([first, second], per_layer=2, num_layers=2) == [3, 1]
    # two of three layers seen: shares of 2·3 = 6 (full L), ⌊4.5⌋ and ⌊1.5⌋, remainder to the last layer seen
    assert reallocate([first, second], per_layer=2, num_layers=3) == [4, 2]


def test_layer_budgets_sum_to_the_total(scores):
    for seen in (4, 8, LAYERS):
        budgets = reallocate(scores[:seen], per_layer=12, num_layers=LAYERS)
        assert sum(budgets) == 12 * LAYERS and min(budgets) >= 0


def test_final_reallocation_leaves_no_layer_at_its_temporary_budget(scores):
    per_layer, r_max = 12, 10
    temporary = r_max * per_layer
    states = list(progressive_orders(scores, per_layer, r_max, period=4))
    # layers 28 and 29 come after the last multiple of 4: before the forced step they hold r_max·per_layer tokens
    assert [order.shape[1] for order in states[LAYERS - 2][28:]] == [temporary]
    final = [order.shape[1] for order in states[-1]]
    budgets = reallocate(scores, per_layer, LAYERS)
    before = [order.shape[1] for order in states[-2]] + [temporary]
    assert final == [min(budget, size) for budget, size in zip(budgets, before)]
    assert all(budget <= size for budget, size in zip(budgets, before))  # no cap binds here, so:
    assert sum(final) == per_layer * LAYERS and max(final) < temporary


def test_caches_only_shrink_and_keep_their_best_tokens(scores):
    states = list(progressive_orders(scores, per_layer=12, r_max=10, period=4))
    for earlier, later in zip(states, states[1:]):
        for old, new in zip(earlier, later):
            assert new.shape[1] <= old.shape[1]
            assert torch.equal(new, old[:, : new.shape[1]])  # a cut keeps the best-scored prefix


def kept_positions(observation, layer, prefix, head):
    """Kept token positions, recovered by matching stored keys to the observed keys (keys are distinct)."""
    keys, full = prefix.materialize().keys[head], observation.keys[layer][head]
    matches = (keys[:, None, :] == full[None, :, :]).all(-1)
    assert (matches.sum(-1) == 1).all()
    return matches.float().argmax(-1).tolist()


def independent_scores(model, observation):
    """Window attention from transformers' eager path, summed over the window, group-averaged, avg-pooled (k=7)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(observation.input_ids[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    h_kv = observation.num_kv_heads
    result = []
    for attention in attentions:
        summed = attention[0, :, -WINDOW:, : CONTEXT - WINDOW].sum(dim=1)
        grouped = summed.reshape(h_kv, -1, summed.shape[-1]).mean(dim=1)
        result.append(F.avg_pool1d(grouped[:, None], 7, padding=3, stride=1)[:, 0])
    return result


def test_each_head_keeps_its_top_scored_tokens_plus_the_window(model, observation):
    budget = 0.1
    prefixes = DynamicKV().compress(observation, budget)
    reference = independent_scores(model, observation)
    window = list(range(CONTEXT - WINDOW, CONTEXT))
    heads_differ = False
    for layer, prefix in enumerate(prefixes):
        lengths = prefix.head_lengths()
        assert len(set(lengths)) == 1  # one budget per layer, every head of it
        kept = [kept_positions(observation, layer, prefix, head) for head in range(observation.num_kv_heads)]
        for head, positions in enumerate(kept):
            top = reference[layer][head].topk(lengths[head] - WINDOW).indices.tolist()
            assert positions == sorted(top + window)
        heads_differ |= kept[0] != kept[1]
    assert heads_differ


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.5])
def test_kept_bytes_are_the_mean_layer_budget(observation, budget):
    prefixes = DynamicKV().compress(observation, budget)
    cache = KVBenchCache(LAYERS, prefixes, CONTEXT)
    assert cache.kv_bytes() / observation.kv_bytes_full() == math.floor(budget * CONTEXT) / CONTEXT
    assert len({prefix.head_lengths()[0] for prefix in prefixes}) > 1  # budgets differ per layer


@pytest.mark.parametrize("context", [37, 1000, 2047])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_kept_tokens_never_exceed_the_budget(context, budget):
    """⌊b·N⌋ tokens per head and layer on average (the window included): a ceiling, whatever N. Uniform layers
    store no lengths, so the measured bytes are the kept tokens' alone. 4 layers keep the prefill short."""
    model = tiny_model("llama-gqa", layers=4)
    observation = prefill(model, random_ids(context, seed=12), ObservationNeeds(window=WINDOW))
    try:
        prefixes = DynamicKV().compress(observation, budget)
    except BudgetError:
        assert math.floor(budget * context) <= WINDOW
        return
    kept = KVBenchCache(4, prefixes, context).kv_bytes()
    assert kept <= budget * observation.kv_bytes_full()
    assert kept == 4 * math.floor(budget * context) * 2 * 2 * 16 * 4  # layers × tokens × heads × K, V × d × fp32


def test_a_budget_within_the_window_is_refused_and_budget_one_keeps_all(observation):
    with pytest.raises(BudgetError, match="lowest reachable budget is 0.023") as refusal:  # ⌊0.023·400⌋ = 9
        DynamicKV().compress(observation, WINDOW / CONTEXT)
    assert "\n" not in str(refusal.value)
    DynamicKV().compress(observation, 0.023)
    cache = KVBenchCache(LAYERS, DynamicKV().compress(observation, 1.0), CONTEXT)
    assert cache.kv_bytes() == observation.kv_bytes_full()

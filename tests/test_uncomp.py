"""UNComp's defining properties (specs/baselines.md §4, §5): entropy, head groups, graded budgets, decode eviction.

The model here has SmolLM2's head layout (9 query heads over 3 KV heads), so odd head counts are exercised.
"""

import math
import re

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import random_ids
from transformers import LlamaConfig, LlamaForCausalLM

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import stored_bytes
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import observe, run_cell
from kvbench.harness.engine.prefill import prefill
from kvbench.harness.engine.scoring_cells import iter_scoring_cells
from kvbench.harness.errors import BudgetError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method
from kvbench.methods.common.head_scores import truncated_matrix_entropy
from kvbench.methods.uncomp import UNComp, decode_cost, entropy_groups, head_capacities, rank_groups

CONTEXT = 300


def test_entropy_of_isotropic_and_rank_one_queries():
    dim = 64
    basis = torch.eye(dim)
    isotropic = torch.cat([basis, -basis]) * 3.0  # centred, Σ = I/d
    assert truncated_matrix_entropy(isotropic, dim).item() == pytest.approx(1.0, abs=1e-6)
    assert truncated_matrix_entropy(isotropic, 32).item() == pytest.approx(0.5, abs=1e-6)  # top 32 of 64 equal σ
    line = torch.linspace(-2, 5, 100)[:, None] * torch.randn(dim, generator=torch.Generator().manual_seed(0))
    assert truncated_matrix_entropy(line + 7.0, 32).item() == pytest.approx(0.0, abs=1e-6)
    # In between: two directions with weights 3/4 and 1/4.
    two = torch.cat([basis[:1].repeat(3, 1), -basis[:1].repeat(3, 1), basis[1:2], -basis[1:2]])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(dim)
    assert truncated_matrix_entropy(two, 32).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("heads", "groups", "sizes"), [(3, 2, [2, 1]), (9, 2, [5, 4]), (5, 3, [2, 2, 1]), (1, 2, [1])])
def test_groups_cover_every_head_exactly_once(heads, groups, sizes):
    keys = torch.rand(4, heads, generator=torch.Generator().manual_seed(heads))
    ids = rank_groups(keys, groups)
    for layer in range(4):
        assert sorted(torch.bincount(ids[layer], minlength=len(sizes)).tolist(), reverse=True) == sizes
        order = keys[layer].argsort().tolist()  # lower keys → earlier groups
        assert ids[layer, order].tolist() == sorted(ids[layer].tolist())


def test_entropy_groups_follow_the_majority_of_samples():
    # 9 query heads over 3 KV heads; KV head 2 is the most uncertain in every sample, KV head 0 in two of three.
    def sample(order):
        entropy = torch.zeros(1, 9)
        for rank, kv in enumerate(order):
            entropy[0, kv * 3 : kv * 3 + 3] = 1.0 - rank * 0.3 + torch.arange(3) * 0.01
        return entropy

    ids = entropy_groups([sample([2, 0, 1]), sample([2, 1, 0]), sample([0, 2, 1])], num_kv_heads=3, groups=2)
    assert ids.tolist() == [[0, 1, 0]]


@pytest.mark.parametrize(
    ("groups", "mean", "expected"),
    [([[0, 1]], 150, [200, 100]), ([[0, 0, 1]], 100, [120, 120, 60]), ([[1, 0]], 30, [20, 40])],
)
def test_group_budgets_are_graded_two_to_one(groups, mean, expected):
    # Equal groups: C_hi = 4B/3, C_lo = 2B/3; SmolLM2's 2 + 1 KV heads: C_lo = 3B/5, C_hi = 6B/5.
    assert head_capacities(torch.tensor(groups), CONTEXT, mean / CONTEXT, UNComp().config) == [expected]


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.33, 0.5, 0.7, 0.9, 1.0])
def test_group_budgets_average_to_the_budget_within_bounds(budget):
    groups = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    mean = math.floor(budget * CONTEXT)
    for caps, layer in zip(head_capacities(groups, CONTEXT, budget, UNComp().config), groups):
        assert sum(caps) == 3 * mean  # the per-KV-head mean is ⌊b·N⌋ (a ceiling), not 1.125×
        assert all(9 <= c <= CONTEXT for c in caps)
        high = [c for c, g in zip(caps, layer) if g == 0]
        low = [c for c, g in zip(caps, layer) if g == 1]
        if max(high) < CONTEXT and min(low) > 9:  # neither bound binds: high : low = 2 : 1 up to rounding
            assert all(abs(h - 2 * lo) <= 2 for h in high for lo in low)
    if budget == 1.0:
        assert head_capacities(groups, CONTEXT, budget, UNComp().config) == [[CONTEXT] * 3] * 3


def test_refuses_budgets_below_the_window():
    with pytest.raises(BudgetError, match="lowest reachable budget is 0.03") as refusal:
        head_capacities(torch.tensor([[0, 1]]), CONTEXT, 0.02, UNComp().config)
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("context", [37, 101, 1000, 2047])
def test_the_budget_a_refusal_names_is_reachable(context):
    groups, config = torch.tensor([[0, 1]]), UNComp().config
    with pytest.raises(BudgetError) as refusal:
        head_capacities(groups, context, 8 / context, config)
    lowest = float(re.search(r"lowest reachable budget is ([0-9.]+)", str(refusal.value)).group(1))
    assert min(head_capacities(groups, context, lowest, config)[0]) >= 9
    with pytest.raises(BudgetError):
        head_capacities(groups, context, lowest - 0.001, config)


@pytest.fixture(scope="module")
def model():
    """SmolLM2's head layout in miniature: 9 query heads, 3 KV heads, head_dim 16."""
    config = LlamaConfig(
        vocab_size=4000,
        hidden_size=144,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)
    return model.eval()


@pytest.fixture(scope="module")
def method(model):
    method = UNComp(calibration_samples=2, calibration_tokens=256)
    method.load_calibration(method.calibrate(model, build_tasks_tokenizer(chat_template=False)))
    return method


def test_calibrated_groups_split_three_kv_heads_two_and_one(method):
    assert method.group_ids.shape == (2, 3)
    for layer in method.group_ids:
        assert sorted(layer.tolist()) == [0, 0, 1]


# The fixture's layout in fp32: a kept token's key and value in one layer (3 KV heads), and the decode state's
# window of queries per layer (9 query heads, w = 8): 12 tokens per head's worth of bytes, paid from the budget.
TOKEN_BYTES = 3 * 2 * 16 * 4
WINDOW_BYTES = 9 * 8 * 16 * 4


def test_compressed_heads_keep_their_group_budgets(model, method):
    observation = prefill(model, random_ids(CONTEXT, seed=3), method.needs())
    budget = 0.3
    prefixes = method.compress(observation, budget)
    expected = head_capacities(method.group_ids, CONTEXT, budget, method.config, decode_cost(observation, 8))
    for prefix, caps in zip(prefixes, expected):
        assert prefix.head_lengths() == caps and prefix.lengths is not None  # ragged, stored packed
        assert sum(caps) == 3 * (math.floor(budget * CONTEXT) - WINDOW_BYTES // TOKEN_BYTES)  # 3 · (90 − 12)


def test_kv_bytes_after_compression_are_the_hand_count(model, method):
    """Keys and values of every kept token, the int32 length per KV head of each ragged layer, and the decode
    state: the w window queries [H_q, w, d] of every evicting layer. Nothing else (no positions: stored tokens
    stay in position order, the window last)."""
    observation = prefill(model, random_ids(CONTEXT, seed=3), method.needs())
    budget = 0.3
    cache = KVBenchCache(observation.num_layers, method.compress(observation, budget), CONTEXT)
    h_q, h_kv, d, w, element = 9, 3, 16, method.config.window, 4  # the fixture's layout, fp32
    expected = 0
    for caps in head_capacities(method.group_ids, CONTEXT, budget, method.config, decode_cost(observation, w)):
        expected += sum(caps) * 2 * d * element  # keys + values of the kept tokens
        expected += h_kv * 4 if len(set(caps)) > 1 else 0  # one int32 length per head, when ragged
        expected += h_q * w * d * element if min(caps) < CONTEXT else 0  # the running window's queries
    # floor(0.3·300) = 90 tokens per head less the window's 12: 234 per layer, 2·(234·2·16·4 + 3·4 + 9·8·16·4)
    assert expected == 69_144
    assert cache.kv_bytes() == expected <= budget * observation.kv_bytes_full() + 2 * h_kv * 4


@pytest.mark.parametrize("context", [37, 1000, 2047])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_the_budget_pays_for_the_decode_state(model, method, context, budget):
    """The budget is a ceiling on the kept keys and values and the decode state together; only the harness's
    int32 lengths of ragged heads come on top. The heads keep what the window's queries leave of it."""
    observation = prefill(model, random_ids(context, seed=21), method.needs())
    layers = observation.num_layers
    mean = math.floor((budget * context * TOKEN_BYTES * layers - WINDOW_BYTES * layers) / (TOKEN_BYTES * layers))
    try:
        prefixes = method.compress(observation, budget)
    except BudgetError as refusal:
        assert mean < method.config.window + 1 and "lowest reachable budget" in str(refusal)
        return
    cache = KVBenchCache(layers, prefixes, context)
    lengths = sum(4 * p.num_heads for p in prefixes if p.lengths is not None)
    assert cache.kv_bytes() <= budget * observation.kv_bytes_full() + lengths
    assert [sum(p.head_lengths()) for p in prefixes] == [3 * mean] * layers


def stored_keys(layer, head):
    keys = layer.prefix.materialize().keys[head]
    return torch.cat([keys, layer.keys[0, head]]) if layer.tail_length else keys


def test_each_decode_step_evicts_one_token_per_head_keeping_the_size(model, method):
    observation = prefill(model, random_ids(CONTEXT, seed=4), method.needs())
    prefixes = method.compress(observation, 0.3)
    capacities = [p.head_lengths() for p in prefixes]
    cache = KVBenchCache(observation.num_layers, prefixes, CONTEXT)
    question = random_ids(5, seed=5)
    sizes, seen_queries = [], []
    # Keys of the 8 most recent positions per layer, from the context's end and every token fed since.
    recent = [keys[:, -8:] for keys in observation.keys]

    def step_hook(cache, step):
        seen_queries.append(sum(q.shape[1] for q in cache.method_state.log.queries[0]))
        for layer, cached in enumerate(cache.layers):
            recent[layer] = torch.cat([recent[layer], cached.keys[0]], dim=1)[:, -8:]
        method.on_decode_step(cache, step)
        assert all(layer.tail_length == 0 for layer in cache.layers)  # new tokens were absorbed or evicted
        sizes.append([layer.prefix.head_lengths() for layer in cache.layers])
        for layer, cached in enumerate(cache.layers):
            for head in range(3):  # the w most recent positions always stay, last in position order
                assert torch.equal(stored_keys(cached, head)[-8:], recent[layer][head])

    greedy_decode(model, cache, question, 7, eos_token_ids=[], step_hook=step_hook, start_hook=method.on_decode_start)
    assert len(sizes) == 6
    # The question's queries and the first new token's reached the running window before the first eviction.
    assert seen_queries == [len(question) + 1] + [1] * 5
    expected = [[c + len(question) for c in layer] for layer in capacities]
    assert all(step == expected for step in sizes)


@pytest.mark.parametrize("context", [CONTEXT // 2, CONTEXT])
def test_decode_state_is_the_last_w_queries_whatever_the_context(model, method, context):
    """The running window is kept as queries (rows are recomputed each step), never as [g, w, n] rows: the
    queries of the 8 most recent tokens, in the cache's state, 9·8·16·4 bytes per evicting layer at every step."""
    observation = prefill(model, random_ids(context, seed=7), method.needs())
    cache = KVBenchCache(observation.num_layers, method.compress(observation, 0.3), context)
    state = cache.method_state
    question = random_ids(5, seed=8)
    recent = {layer: observation.window_queries[layer][:, -8:] for layer in state.queries}
    state_bytes = []

    def step_hook(cache, step):
        for layer in recent:
            recent[layer] = torch.cat([recent[layer], *state.log.queries[layer]], dim=1)[:, -8:]
        method.on_decode_step(cache, step)
        for layer, queries in state.queries.items():
            assert torch.equal(queries, recent[layer])
        state_bytes.append(stored_bytes(state))

    greedy_decode(model, cache, question, 5, eos_token_ids=[], step_hook=step_hook, start_hook=method.on_decode_start)
    assert len(state_bytes) == 4 and set(state_bytes) == {len(state.queries) * 9 * 8 * 16 * 4}


def test_each_cache_decodes_with_its_own_state(model, method):
    """The state travels with the cache: compressing a second context does not disturb decoding the first."""
    question = random_ids(5, seed=12)

    def compressed(seed):
        observation = prefill(model, random_ids(CONTEXT, seed=seed), method.needs())
        return KVBenchCache(observation.num_layers, method.compress(observation, 0.3), CONTEXT)

    def answer(cache):
        hooks = dict(step_hook=method.on_decode_step, start_hook=method.on_decode_start)
        generation = greedy_decode(model, cache, question, 12, eos_token_ids=[], keep_logits=True, **hooks)
        return generation.token_ids, torch.stack(generation.step_logits)

    alone = [answer(compressed(13)), answer(compressed(14))]
    first, second = compressed(13), compressed(14)
    assert first.method_state is not second.method_state
    for (tokens, logits), (tokens_alone, logits_alone) in zip([answer(first), answer(second)], alone, strict=True):
        assert tokens == tokens_alone and torch.equal(logits, logits_alone)
    assert not torch.equal(alone[0][1], alone[1][1])  # the contexts differ, and so do their answers' logits


def test_budget_one_keeps_everything_and_never_evicts(model, method):
    observation = prefill(model, random_ids(CONTEXT, seed=6), method.needs())
    prefixes = method.compress(observation, 1.0)
    assert prefixes.decode_state is None
    assert KVBenchCache(observation.num_layers, prefixes, CONTEXT).kv_bytes() == observation.kv_bytes_full()
    for layer, prefix in enumerate(prefixes):
        assert torch.equal(prefix.materialize().keys, observation.keys[layer])


def test_missing_calibration_is_one_line(model):
    observation = prefill(model, random_ids(50, seed=7), UNComp().needs())
    with pytest.raises(Exception, match=re.escape("run 'kvbench calibrate uncomp")):
        UNComp().compress(observation, 0.5)


def test_scoring_a_continuation_evicts_as_decoding_it_would(model, method):
    """Perplexity/loglikelihood cells feed uncomp token by token through its hooks: scoring the answer uncomp
    generated reproduces the logits it generated it with, and continuations do not share eviction state."""
    loaded = LoadedModel("tiny", "memory:tiny", model, None, torch.device("cpu"), torch.float32)
    context, question = random_ids(CONTEXT, seed=9), random_ids(5, seed=10)
    assert method.acts_while_decoding and not get_method("snapkv").acts_while_decoding
    observed = observe(loaded, context, method.needs())
    decoded = run_cell(loaded, observed, method, 0.3, question, 8, keep_logits=True)
    other = random_ids(6, seed=11)
    ((_, _, cell),) = iter_scoring_cells(loaded, context, question, [other, decoded.token_ids], [(method, 0.3)])
    ((_, _, alone),) = iter_scoring_cells(loaded, context, question, [other], [(method, 0.3)])
    expected = [
        torch.log_softmax(step, dim=-1)[token].item() for step, token in zip(decoded.step_logits, decoded.token_ids)
    ]
    assert cell.scores[1].greedy and cell.scores[1].logprobs == expected
    assert cell.scores[0].logprobs == alone.scores[0].logprobs

"""Defining properties of the attention scorers h2o, tova and expected_attention, of AdaKV over any of them, and
of their decode-time variants, each against a computation written here (specs/reference_methods.md §3, §5, §7, §8).

The contract every registered method meets (b = 1 equals full, ceilings, shared = own prefill, determinism) is
in test_method_contract.py."""

import math

import pytest
import torch
from tiny_models import random_ids, tiny_model, tiny_tokenizer

from kvbench.harness.cache.attention import kvbench_attention_enabled
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import stored_bytes
from kvbench.harness.engine.decode import greedy_decode, next_token_logits
from kvbench.harness.engine.pipeline import TimedObservation, run_cell
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method
from kvbench.methods.common.eviction import gather_heads
from kvbench.methods.common.scorers import SCORERS, get_scorer
from kvbench.methods.expected_attention import ExpectedAttentionConfig, expected_attention_scores
from kvbench.methods.h2o import H2OConfig, H2ODecodeState, h2o_scores
from kvbench.methods.tova import TOVADecodeState

CONTEXT = 300
LAYERS = 3


def peaked_model():
    """The tiny Llama with queries and keys scaled ×5: random init leaves attention nearly uniform (logits of
    std ≈ 0.03), where every head ranks tokens alike; ×25 logits give heads preferences of their own."""
    model = tiny_model("llama-gqa", layers=LAYERS)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(5)
            layer.self_attn.k_proj.weight.mul_(5)
    return model


@pytest.fixture(scope="module")
def model():
    return peaked_model()


@pytest.fixture(scope="module")
def ids():
    return random_ids(CONTEXT, seed=5)


@pytest.fixture(scope="module")
def observation(model, ids):
    return prefill(model, ids, ObservationNeeds(window=128, column_sums=True, hidden_states=True))


@pytest.fixture(scope="module")
def eager_attention(ids):
    """Every layer's full attention matrix [H_q, N, N] from transformers' eager attention (the same weights)."""
    eager = peaked_model()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([ids]), output_attentions=True)
    return [a[0].double() for a in out.attentions]


def group_mean(scores, num_kv_heads):
    return scores.reshape(num_kv_heads, -1, *scores.shape[1:]).mean(dim=1)


def kept_positions(observation, layer, prefix):
    """Per KV head, the set of context positions kept, recovered by matching stored keys to the observed keys."""
    kv = prefix.materialize()
    sets = []
    for head in range(observation.num_kv_heads):
        matches = (kv.keys[head][:, None, :] == observation.keys[layer][head][None, :, :]).all(-1)
        assert (matches.sum(-1) == 1).all()
        sets.append(set(matches.float().argmax(-1).tolist()))
    return sets


# h2o: observed attention from chunked column sums


@pytest.mark.parametrize("normalize", [True, False])
def test_h2o_scores_equal_eager_attention_sums(observation, eager_attention, normalize):
    n = CONTEXT
    for layer, attention in enumerate(eager_attention):
        received = attention.sum(dim=-2)  # [H_q, N]: Σ_i A[i, j]
        if normalize:
            received = received / torch.tensor([n - j for j in range(n)], dtype=received.dtype)
        expected = group_mean(received, observation.num_kv_heads)
        ours = h2o_scores(observation, layer, H2OConfig(normalize=normalize), n_kept=75)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recent_ratio", [0.0, 0.5])
def test_h2o_keeps_the_heavy_hitters_and_the_recent_share(observation, eager_attention, recent_ratio):
    budget = 0.25
    n_kept = int(CONTEXT * budget)
    n_recent = int(n_kept * recent_ratio)
    prefixes = get_method("h2o", recent_ratio=recent_ratio).compress(observation, budget)
    for layer, prefix in enumerate(prefixes):
        received = eager_attention[layer].sum(dim=-2) / torch.arange(CONTEXT, 0, -1, dtype=torch.float64)
        reference = group_mean(received, observation.num_kv_heads)[:, : CONTEXT - n_recent]
        recent = set(range(CONTEXT - n_recent, CONTEXT))
        for head, kept in enumerate(kept_positions(observation, layer, prefix)):
            heavy = set(reference[head].topk(n_kept - n_recent).indices.tolist())
            assert kept == heavy | recent


# tova: the last query's attention, one token set per layer


def test_tova_keeps_one_token_set_per_layer(observation, eager_attention):
    budget = 0.25
    n_kept = int(CONTEXT * budget)
    prefixes = get_method("tova").compress(observation, budget)
    for layer, prefix in enumerate(prefixes):
        sets = kept_positions(observation, layer, prefix)
        assert all(kept == sets[0] for kept in sets)  # the same tokens in every KV head
        row = eager_attention[layer][:, -1, :].mean(dim=0)  # mean over all query heads
        expected = set(row[:-1].topk(n_kept - 1).indices.tolist()) | {CONTEXT - 1}  # the last token protected
        assert sets[0] == expected


# expected_attention: closed form from the context's query statistics


def captured_pre_rope_queries(model, ids):
    """[H_q, N, d] per layer from the q_proj outputs of a plain forward (forward hooks), not from hidden states."""
    captured = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda _m, _i, out, index=index: captured.__setitem__(index, out))
        for index, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    d = model.config.head_dim
    return [captured[i][0].reshape(len(ids), -1, d).transpose(0, 1).double() for i in range(len(captured))]


def averaged_rotation(theta, d, start, count):
    """Mean over positions of the RoPE rotation, built pair by pair: (i, i + d/2) turns by t·θ^(−2i/d)."""
    total = torch.zeros(d, d, dtype=torch.float64)
    for t in range(start, start + count):
        rotation = torch.zeros(d, d, dtype=torch.float64)
        for i in range(d // 2):
            angle = t * theta ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            j = i + d // 2
            rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
        total += rotation
    return total / count


def direct_expected_attention(model, ids, observation, layer, config):
    """reference_methods.md §8 written out per query head and key, in float64."""
    d = observation.head_dim
    queries = captured_pre_rope_queries(model, ids)[layer][:, config.n_sink :]
    rotation = averaged_rotation(model.config.rope_parameters["rope_theta"], d, CONTEXT, config.n_future_positions)
    keys = observation.keys[layer].double()
    values = observation.values[layer].double()
    h_q, h_kv = queries.shape[0], observation.num_kv_heads
    group = h_q // h_kv
    per_query_head = []
    for h in range(h_q):
        mu = queries[h].mean(dim=0)
        centred = queries[h] - mu
        sigma = centred.T @ centred / queries.shape[1]
        mu_bar, sigma_bar = rotation @ mu, rotation @ sigma @ rotation.T
        k = keys[h // group, config.n_sink :]
        z = torch.stack(
            [mu_bar @ kj / math.sqrt(d) + (kj @ sigma_bar @ kj / (2 * d) if config.use_covariance else 0.0) for kj in k]
        )
        per_query_head.append(torch.softmax(z, dim=0))
    scores = torch.stack(per_query_head).reshape(h_kv, group, -1).mean(dim=1)
    if config.use_vnorm:
        scores = (scores + config.epsilon) * values[:, config.n_sink :].norm(dim=-1)
    sinks = torch.full((h_kv, config.n_sink), float("inf"), dtype=torch.float64)
    return torch.cat([sinks, scores], dim=1)


@pytest.mark.parametrize(
    "config",
    [
        ExpectedAttentionConfig(),
        ExpectedAttentionConfig(use_covariance=False, n_future_positions=64),
        ExpectedAttentionConfig(use_vnorm=True, epsilon=1e-2, n_sink=2),
        ExpectedAttentionConfig(use_vnorm=False),
    ],
)
def test_expected_attention_matches_its_formula(model, ids, observation, config):
    for layer in range(LAYERS):
        expected = direct_expected_attention(model, ids, observation, layer, config)
        ours = expected_attention_scores(observation, layer, config, n_kept=75).double()
        torch.testing.assert_close(ours, expected, rtol=2e-4, atol=1e-7)


def test_expected_attention_keeps_the_sinks_and_the_top_scores(model, ids, observation):
    budget = 0.25
    n_kept = int(CONTEXT * budget)
    prefixes = get_method("expected_attention").compress(observation, budget)
    config = ExpectedAttentionConfig()
    for layer, prefix in enumerate(prefixes):
        expected = direct_expected_attention(model, ids, observation, layer, config)
        for head, kept in enumerate(kept_positions(observation, layer, prefix)):
            assert kept == set(expected[head].topk(n_kept).indices.tolist())
            assert set(range(config.n_sink)) <= kept


# AdaKV over any scorer: global top-k across a layer's heads, with the safeguard


@pytest.mark.parametrize("base", sorted(SCORERS))
def test_adakv_keeps_the_layer_total_and_the_safeguard(observation, base):
    budget, alpha = 0.25, 0.2
    n_kept = int(CONTEXT * budget)
    n_safe = int(n_kept * alpha)
    h_kv = observation.num_kv_heads
    prefixes = get_method("adakv", base=base).compress(observation, budget)
    scorer = get_scorer(base)
    ragged = False
    for layer, prefix in enumerate(prefixes):
        lengths = prefix.head_lengths()
        assert sum(lengths) == h_kv * n_kept  # the layer's total, exactly
        ragged |= len(set(lengths)) > 1
        assert prefix.lengths is not None or len(set(lengths)) == 1  # ragged heads packed, never padded
        scores = scorer.scores(observation, layer, n_kept)
        kept = kept_positions(observation, layer, prefix)
        secured = [set(scores[h].topk(n_safe).indices.tolist()) for h in range(h_kv)]
        for h in range(h_kv):
            assert secured[h] <= kept[h]  # each head's safeguard survives
            assert set(torch.isposinf(scores[h]).nonzero().flatten().tolist()) <= kept[h]  # protected tokens too
        # Global top-k: beyond the safeguards, no evicted entry outranks a kept one, whichever heads they are in.
        competing = [scores[h, sorted(kept[h] - secured[h])] for h in range(h_kv)]
        evicted = [scores[h, sorted(set(range(CONTEXT)) - kept[h])] for h in range(h_kv)]
        lowest_kept = torch.cat(competing).min() if sum(c.numel() for c in competing) else float("inf")
        highest_evicted = torch.cat(evicted).max()
        assert highest_evicted <= lowest_kept
    if base == "tova":
        assert not ragged  # one score row per layer: every head keeps the same tokens
    else:
        assert ragged


def old_adakv_snapkv(observation, budget, window=64, kernel=5, pooling="avg", alpha=0.2):
    """adakv_snapkv as it was before AdaKV took any scorer (commit 83c5ee5), written out."""
    from kvbench.methods.common.eviction import keep_window_and_top, snapkv_prefix_scores

    n = observation.context_length
    n_kept = int(n * budget)
    window = min(window, n)
    if n_kept <= window:
        return [
            keep_window_and_top(observation, layer, None, n_kept, window) for layer in range(observation.num_layers)
        ]
    prefixes = []
    for layer in range(observation.num_layers):
        scores = torch.full((observation.num_kv_heads, n), float("inf"))
        if window < n:
            scores[:, : n - window] = snapkv_prefix_scores(observation, layer, window, kernel, pooling)
        h_kv = scores.shape[0]
        n_safe = int(n_kept * alpha)
        if n_safe > 0:
            scores.scatter_(1, scores.topk(n_safe, dim=-1).indices, float("inf"))
        chosen = scores.flatten().topk(h_kv * n_kept).indices
        heads, positions = chosen // n, chosen % n
        prefixes.append(gather_heads(observation, layer, [positions[heads == h] for h in range(h_kv)]))
    return prefixes


def assert_same_prefixes(ours, reference):
    for a, b in zip(ours, reference, strict=True):
        assert a.head_lengths() == b.head_lengths()
        ka, kb = a.materialize(), b.materialize()
        for head in range(a.num_heads):
            assert torch.equal(ka.keys[head], kb.keys[head]) and torch.equal(ka.values[head], kb.values[head])


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("options", [{}, {"window": 16, "kernel": 3, "pooling": "max", "alpha_safeguard": 0.5}])
def test_adakv_snapkv_results_are_unchanged(observation, budget, options):
    ours = get_method("adakv_snapkv", **options).compress(observation, budget)
    old = {k: v for k, v in options.items() if k != "alpha_safeguard"}
    reference = old_adakv_snapkv(observation, budget, alpha=options.get("alpha_safeguard", 0.2), **old)
    assert_same_prefixes(ours, reference)
    base_options = "/".join(f"{k}={v}" for k, v in old.items())
    generic = get_method(
        "adakv",
        base="snapkv",
        base_options=base_options,
        **{k: v for k, v in options.items() if k == "alpha_safeguard"},
    )
    assert_same_prefixes(generic.compress(observation, budget), reference)


def test_adakv_base_options_are_typed_and_canonical():
    assert get_method("adakv:base=expected_attention:base_options=epsilon=1e-2").config.base_options == "epsilon=0.01"
    assert get_method("adakv", base="snapkv", base_options="window=64").label == "adakv"  # the default, dropped
    spec = "adakv:base=h2o:base_options=recent_ratio=0.5/normalize=false"
    assert get_method(spec).label == "adakv:base=h2o:base_options=normalize=false/recent_ratio=0.5"  # field order
    with pytest.raises(KVBenchError, match="base must be one of snapkv, h2o, tova, expected_attention, knorm"):
        get_method("adakv", base="nope")
    with pytest.raises(KVBenchError, match="no option"):
        get_method("adakv", base="h2o", base_options="windw=3")
    with pytest.raises(KVBenchError, match="acts while decoding"):
        get_method("adakv", base="tova", base_options="decode_evict=true")


# Eviction while decoding: state in the cache, size held, b = 1 equals full


@pytest.fixture(scope="module")
def loaded(model):
    return LoadedModel("tiny", "memory:tiny-llama-gqa", model, tiny_tokenizer(), torch.device("cpu"), torch.float32)


QUESTION = random_ids(6, seed=9)


@pytest.mark.parametrize("name", ["h2o", "tova"])
def test_decode_eviction_at_budget_one_answers_like_full(loaded, observation, name):
    shared = TimedObservation(observation, 0.0)
    full = run_cell(loaded, shared, get_method("full"), 1.0, QUESTION, 10, keep_logits=True)
    ours = run_cell(loaded, shared, get_method(name, decode_evict=True), 1.0, QUESTION, 10, keep_logits=True)
    assert ours.token_ids == full.token_ids
    for a, b in zip(ours.step_logits, full.step_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_decode_flags_say_whether_the_cache_changes(observation):
    assert not get_method("h2o").acts_while_decoding and get_method("h2o", decode_evict=True).acts_while_decoding
    assert not get_method("tova").acts_while_decoding and get_method("tova", decode_evict=True).acts_while_decoding
    assert get_method("h2o").compress(observation, 0.25).decode_state is None
    assert get_method("tova").compress(observation, 0.25).decode_state is None


def stepwise(model, method, observation, budget, steps, before_step):
    """Compress, then feed the question and `steps` tokens one at a time, calling `before_step(cache)` just before
    each decode hook; returns the cache."""
    prefixes = method.compress(observation, budget)
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    method.on_decode_start(cache)
    with torch.inference_mode(), kvbench_attention_enabled(model):
        logits = next_token_logits(model, cache, QUESTION)
        for step in range(steps):
            logits = next_token_logits(model, cache, [int(logits.argmax())])
            before_step(cache)
            method.on_decode_step(cache, step)
    return cache


def stored(cached):
    """[H, n, d] keys and values a layer holds now: its prefix then its tail."""
    prefix = cached.prefix.materialize()
    return torch.cat([prefix.keys, cached.keys[0]], dim=1), torch.cat([prefix.values, cached.values[0]], dim=1)


def reference_rows(queries, keys, scaling):
    """Attention [H_q, m, n] of the m newest queries, keys repeated to every query head (an eager-style
    computation, causal for the last m keys)."""
    h_q, m, _ = queries.shape
    n = keys.shape[1]
    repeated = keys.repeat_interleave(h_q // keys.shape[0], dim=0).double()
    logits = queries.double() @ repeated.transpose(1, 2) * scaling
    for i in range(m):
        logits[:, i, n - m + i + 1 :] = float("-inf")
    return torch.softmax(logits, dim=-1)


def test_h2o_decode_accumulates_attention_and_holds_its_size(model, observation):
    method = get_method("h2o", decode_evict=True, recent_ratio=0.5)
    budget = 0.25
    # Each kept token's fp32 score and int32 position come out of the budget, beside its key and value.
    token = 2 * observation.head_dim * observation.keys[0].element_size()
    n_kept = math.floor(CONTEXT * budget * token / (token + 4 + 4))
    assert n_kept < int(CONTEXT * budget)
    size = n_kept + len(QUESTION)
    h_kv = observation.num_kv_heads
    checks = []

    def before_step(cache):
        state = cache.method_state
        layer = 1
        keys, _ = stored(cache.layers[layer])
        queries = torch.cat(state.log.queries[layer], dim=1)
        rows = reference_rows(queries, keys, state.scaling).reshape(h_kv, -1, queries.shape[1], keys.shape[1])
        added = rows.mean(dim=1).sum(dim=1)
        old = torch.cat([state.accumulated[layer].double(), torch.zeros(h_kv, queries.shape[1])], dim=1)
        seen = cache.layers[layer].get_seq_length()
        latest = torch.arange(seen - queries.shape[1], seen).expand(h_kv, -1)
        positions = torch.cat([state.positions[layer].long(), latest], dim=1)
        checks.append((old + added, positions, seen))

    cache = stepwise(model, method, observation, budget, 5, before_step)
    state = cache.method_state
    assert isinstance(state, H2ODecodeState) and not hasattr(method, "state")
    for cached in cache.layers:
        assert cached.tail_length == 0 and cached.prefix.head_lengths() == [size] * h_kv
    # After the last step: each surviving token's sum is what it had plus the attention it just received.
    expected, positions, seen = checks[-1]
    for h in range(h_kv):
        survivors = [positions[h].tolist().index(p) for p in state.positions[1][h].tolist()]
        torch.testing.assert_close(state.accumulated[1][h].double(), expected[h, survivors], rtol=1e-5, atol=1e-6)
        assert seen - 1 in state.positions[1][h].tolist()  # the newest token stays
    # Everything the method keeps between steps is in the cache, where kv_bytes counts it.
    prefix_bytes = sum(stored_bytes(layer.prefix) for layer in cache.layers)
    assert cache.kv_bytes() == prefix_bytes + stored_bytes(state) > prefix_bytes


def test_tova_decode_drops_the_least_attended_token_in_every_head(model, observation):
    method = get_method("tova", decode_evict=True)
    budget = 0.25
    size = int(CONTEXT * budget) + len(QUESTION)
    expected = []

    def before_step(cache):
        state = cache.method_state
        layer = 2
        keys, values = stored(cache.layers[layer])
        newest = torch.cat(state.log.queries[layer], dim=1)[:, -1:]
        row = reference_rows(newest, keys, state.scaling)[:, 0].mean(dim=0)
        dropped = int(row[:-1].argmin())
        keep = [i for i in range(keys.shape[1]) if i != dropped]
        expected.append((keys[:, keep], values[:, keep]))

    cache = stepwise(model, method, observation, budget, 4, before_step)
    assert isinstance(cache.method_state, TOVADecodeState)
    kv = cache.layers[2].prefix.materialize()
    assert torch.equal(kv.keys, expected[-1][0]) and torch.equal(kv.values, expected[-1][1])
    for cached in cache.layers:
        assert cached.prefix.head_lengths() == [size] * observation.num_kv_heads


@pytest.mark.parametrize("name", ["h2o", "tova"])
def test_decode_state_travels_with_its_cache(loaded, model, observation, name):
    """Two sequences decoded interleaved by one method object answer as each does alone."""
    method = get_method(name, decode_evict=True)

    def alone(budget):
        cache = KVBenchCache(observation.num_layers, method.compress(observation, budget), CONTEXT)
        return greedy_decode(
            model, cache, QUESTION, 8, [], step_hook=method.on_decode_step, start_hook=method.on_decode_start
        ).token_ids

    expected = {budget: alone(budget) for budget in (0.2, 0.5)}
    caches = {b: KVBenchCache(observation.num_layers, method.compress(observation, b), CONTEXT) for b in expected}
    tokens = {b: [] for b in expected}
    logits = {}
    with torch.inference_mode(), kvbench_attention_enabled(model):
        for b, cache in caches.items():
            method.on_decode_start(cache)
            logits[b] = next_token_logits(model, cache, QUESTION)
        for step in range(8):
            for b, cache in caches.items():
                tokens[b].append(int(logits[b].argmax()))
                if step + 1 < 8:
                    logits[b] = next_token_logits(model, cache, [tokens[b][-1]])
                    method.on_decode_step(cache, step)
    assert tokens == expected

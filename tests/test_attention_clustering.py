"""Defining properties of attention_clustering (seed 003, specs/seed_methods.md (c)) on tiny random models.

The contract every registered method meets (budget 1 = full, bytes, determinism) is in test_method_contract.py;
here: the k-means rules against hand computations, counts and biases, cache lengths after each prune,
state reset between sequences, and what the importance scopes keep, against plain reference computations.
"""

import math

import pytest
import torch
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import TimedObservation, run_cell
from kvbench.harness.engine.prefill import ObservationNeeds, prefill, streaming_prefill
from kvbench.harness.engine.scoring_cells import iter_scoring_cells
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method
from kvbench.methods.attention_clustering.kmeans import merge
from kvbench.methods.attention_clustering.method import AttentionClustering, attention_importance

LOOKBACK = 16


@pytest.fixture(scope="module")
def model():
    """A tiny random model with sharpened attention: unsharpened, it attends almost uniformly, and the
    importance scores would rank tokens by causality alone (how many queries see them), not by content."""
    model = tiny_model("llama-gqa", layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return model


def nearest_seed(keys, seeds, i):
    """Brute force: the cluster of entry i, seed entries in their own cluster."""
    if i in seeds:
        return seeds.index(i)
    distances = [float(((keys[i] - keys[s]) ** 2).sum()) for s in seeds]
    return distances.index(min(distances))


def test_batch_mean_centroids_are_count_weighted_means_of_their_members():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 20, 4, generator=generator), torch.randn(2, 20, 4, generator=generator)
    counts = torch.randint(1, 6, (2, 20), generator=generator)
    seeds = [1, 4, 9, 13, 17]
    merged = merge(keys, values, counts, torch.tensor(seeds), "batch_mean", 0.01)
    for h in range(2):
        members = [[i for i in range(20) if nearest_seed(keys[h], seeds, i) == c] for c in range(len(seeds))]
        for c, idx in enumerate(members):
            w = counts[h, idx].double()
            mean_key, mean_value = [(w[:, None] * x[h, idx]).sum(0) / w.sum() for x in (keys, values)]
            torch.testing.assert_close(merged.keys[h, c].double(), mean_key, rtol=0, atol=1e-6)
            torch.testing.assert_close(merged.values[h, c].double(), mean_value, rtol=0, atol=1e-6)
            assert merged.counts[h, c] == counts[h, idx].sum()
    assert torch.equal(merged.counts.sum(dim=1), counts.sum(dim=1))


def test_online_rule_matches_hand_computed_updates():
    # Seeds are entries 0 and 2; entries 0, 1, 3 join cluster 0, entry 2 cluster 1; entry 3 stands for 2 tokens.
    keys = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [0.0, 1.0]]])
    values = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    merged = merge(keys, values, torch.tensor([[1, 1, 1, 2]]), torch.tensor([0, 2]), "online", 0.5)
    # μ0: (0,0) → ½(0,0)+½(0,0) = (0,0) → ½(0,0)+½(1,0) = (.5,0) → ½(.5,0)+½(0,1) = (.25,.5) → (.125,.75)
    torch.testing.assert_close(merged.keys, torch.tensor([[[0.125, 0.75], [10.0, 10.0]]]))
    # ν0: 1 → 1 → ½·1+½·3 = 2 → ½·2+½·7 = 4.5 → ½·4.5+½·7 = 5.75
    torch.testing.assert_close(merged.values, torch.tensor([[[5.75], [5.0]]]))
    assert merged.counts.tolist() == [[4, 1]]


def test_online_rule_equals_the_sequential_loop_at_the_paper_rate():
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(3, 40, 8, generator=generator), torch.randn(3, 40, 8, generator=generator)
    counts = torch.randint(1, 4, (3, 40), generator=generator)
    seeds = [0, 5, 11, 23, 31, 39]
    merged = merge(keys, values, counts, torch.tensor(seeds), "online", 0.01)
    for h in range(3):
        mu, nu = keys[h, seeds].double().clone(), values[h, seeds].double().clone()
        for i in range(40):
            c = nearest_seed(keys[h], seeds, i)
            for _ in range(int(counts[h, i])):
                mu[c] = 0.99 * mu[c] + 0.01 * keys[h, i]
                nu[c] = 0.99 * nu[c] + 0.01 * values[h, i]
        torch.testing.assert_close(merged.keys[h].double(), mu, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged.values[h].double(), nu, rtol=0, atol=1e-6)


def test_importance_counts_a_merged_entry_like_its_members():
    generator = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(4, 6, 8, generator=generator), torch.randn(2, 10, 8, generator=generator)
    bias = torch.zeros(2, 10)
    bias[:, 0] = math.log(3)
    merged = attention_importance(queries[:, -4:], keys, bias, 0.35)
    copies = torch.cat([keys[:, :1].expand(-1, 3, -1), keys[:, 1:]], dim=1)
    separate = attention_importance(queries[:, -4:], copies, None, 0.35)
    torch.testing.assert_close(merged[:, 0], separate[:, :3].sum(dim=1))
    torch.testing.assert_close(merged[:, 1:], separate[:, 3:])


def run_with_spy(model, method, ids, budget):
    """Prefill through the method's hook, recording stored entries per head and counts after every chunk."""
    stream = method.stream(model, len(ids), budget)
    lengths, snapshots = [], []

    def hook(cache, index, queries, scaling):
        stream.after_chunk(cache, index, queries, scaling)
        first = cache.layers[0]
        lengths.append(first.tail_length + (first.prefix.head_lengths()[0] if first.prefix is not None else 0))
        if first.prefix is not None:
            snapshots.append((dict(stream.counts), [layer.prefix.materialize().bias for layer in cache.layers]))

    cache, logits = streaming_prefill(model, ids, stream.chunk_size, hook)
    return cache, logits, lengths, snapshots


@pytest.mark.parametrize(
    "options, budget, lengths",
    [
        # B = 40: prune at t = 64, 96, 128 and at the end (t = 160).
        (dict(cluster=False), 0.25, [32, 40, 40, 40, 40]),
        # K = ⌊0.1·160·128/136⌋ = 15, B = 4K = 60: prune + merge at t = 64 and 128, merge only at the end.
        (dict(), 0.1, [32, 15, 47, 15, 15]),
    ],
)
def test_cache_length_drops_to_B_or_K_after_each_prune(model, options, budget, lengths):
    ids = random_ids(160, seed=3)
    method = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK, **options)
    cache, logits, seen, _ = run_with_spy(model, method, ids, budget)
    assert seen == lengths
    assert all(layer.tail_length == 0 and layer.get_seq_length() == 160 for layer in cache.layers)
    full_bytes = prefill(model, ids, ObservationNeeds()).kv_bytes_full()
    assert budget - 0.02 <= cache.kv_bytes() / full_bytes <= budget
    # The chunks after the first prune attended to the compressed cache: the logits moved away from full.
    assert not torch.allclose(logits, prefill(model, ids, ObservationNeeds()).last_logits, atol=1e-4)


def test_counts_sum_to_kept_tokens_and_bias_is_log_count(model):
    ids = random_ids(160, seed=4)
    method = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK)
    _, _, _, snapshots = run_with_spy(model, method, ids, 0.1)
    first_counts, _ = snapshots[0]
    for counts in first_counts.values():  # the first merge: 60 raw tokens kept, merged into 15 centroids
        assert counts.shape == (2, 15) and (counts >= 1).all() and counts.sum(dim=1).tolist() == [60, 60]
    for counts, biases in snapshots:
        for layer, bias in enumerate(biases):
            assert torch.equal(bias, counts[layer].double().log().float())
            assert (counts[layer].sum(dim=1) <= 160).all()


def test_state_resets_between_sequences(model):
    a, b = random_ids(100, seed=5), random_ids(130, seed=6)
    method = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK)
    first_a, then_b = method.prefill_and_compress(model, a, 0.2), method.prefill_and_compress(model, b, 0.2)
    alone_b = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK).prefill_and_compress(model, b, 0.2)
    again_a = method.prefill_and_compress(model, a, 0.2)
    for (one, logits_one), (other, logits_other) in [(then_b, alone_b), (first_a, again_a)]:
        assert torch.equal(logits_one, logits_other)
        for x, y in zip(one.layers, other.layers):
            kx, ky = x.prefix.materialize(), y.prefix.materialize()
            assert torch.equal(kx.keys, ky.keys) and torch.equal(kx.values, ky.values) and torch.equal(kx.bias, ky.bias)


def reference_importance(observation, layer, lookback=LOOKBACK):
    """softmax(q·Kᵀ) of the last `lookback` queries, causal, summed over rows, averaged per query group: [H_kv, N]."""
    keys, queries = observation.keys[layer], observation.window_queries[layer][:, -lookback:]
    h_kv, n = keys.shape[:2]
    group = queries.shape[0] // h_kv
    out = torch.zeros(h_kv, n)
    for hq in range(queries.shape[0]):
        for r in range(lookback):
            position = n - lookback + r
            logits = keys[hq // group, : position + 1] @ queries[hq, r] * observation.scaling
            out[hq // group, : position + 1] += torch.softmax(logits, dim=-1) / group
    return out


def kept_positions(observation, layer, head, keys):
    """Positions of stored raw tokens, matched against the one-pass prefill's keys."""
    matches = (keys[:, None, :] == observation.keys[layer][head][None]).all(-1)
    assert (matches.sum(-1) == 1).all()
    return matches.float().argmax(-1).tolist()


def top_positions(scores, keep):
    return sorted(scores.topk(keep).indices.tolist())


def test_the_lookback_spans_the_chunks_since_the_last_prune(model):
    # P = 16 < Δ = 40, B = 50: the first prune comes at t = 64 and scores with the queries of tokens 24 … 63,
    # which lie in three chunks. Nothing was pruned before, so the one-pass prefill of those 64 tokens is the
    # reference (the chunked keys match it up to float rounding).
    ids = random_ids(100, seed=12)
    method = AttentionClustering(pruning_interval=16, lookback_window=40, cluster=False)
    stream = method.stream(model, len(ids), 0.5)
    observation = prefill(model, ids[:64], ObservationNeeds(window=40))
    kept = []

    def hook(cache, index, queries, scaling):
        stream.after_chunk(cache, index, queries, scaling)
        if index == 3:
            kept.extend(cache.layers[layer].prefix.materialize().keys for layer in range(2))

    streaming_prefill(model, ids, stream.chunk_size, hook)
    expected = top_positions(sum(reference_importance(observation, layer, 40).sum(dim=0) for layer in range(2)), 50)
    for layer, keys in enumerate(kept):
        for head in range(2):
            assert torch.cdist(keys[head], observation.keys[layer][head]).argmin(dim=-1).tolist() == expected


@pytest.fixture(scope="module")
def one_chunk(model):
    """A 100-token context compressed once (P > N): kept tokens can be matched to the one-pass prefill."""
    ids = random_ids(100, seed=7)
    return ids, prefill(model, ids, ObservationNeeds(window=LOOKBACK))


def test_shared_scope_keeps_the_top_of_the_score_summed_over_layers_and_heads(model, one_chunk):
    ids, observation = one_chunk
    method = AttentionClustering(pruning_interval=128, lookback_window=LOOKBACK, cluster=False)
    cache, _ = method.prefill_and_compress(model, ids, 0.3)
    total = sum(reference_importance(observation, layer).sum(dim=0) for layer in range(2))
    expected = top_positions(total, 30)
    for layer in range(2):
        prefix = cache.layers[layer].prefix.materialize()
        for head in range(2):
            assert kept_positions(observation, layer, head, prefix.keys[head]) == expected


def test_per_layer_head_scope_keeps_each_heads_own_top(model, one_chunk):
    ids, observation = one_chunk
    method = AttentionClustering(pruning_interval=128, lookback_window=LOOKBACK, cluster=False, scope="per_layer_head")
    cache, _ = method.prefill_and_compress(model, ids, 0.3)
    kept = set()
    for layer in range(2):
        prefix, scores = cache.layers[layer].prefix.materialize(), reference_importance(observation, layer)
        for head in range(2):
            positions = kept_positions(observation, layer, head, prefix.keys[head])
            assert positions == top_positions(scores[head], 30)
            kept.add(tuple(positions))
    assert len(kept) > 1  # heads chose differently: nothing shared or broadcast


@pytest.mark.parametrize("rule", ["online", "batch_mean"])
def test_each_layer_and_head_merges_its_own_kept_tokens(model, one_chunk, rule):
    ids, observation = one_chunk
    method = AttentionClustering(
        pruning_interval=128, lookback_window=LOOKBACK, scope="per_layer_head", centroid_rule=rule, seed=3
    )
    cache, _ = method.prefill_and_compress(model, ids, 0.2)
    clusters = math.floor(0.2 * 100 * 128 / (128 + 4 + 4))  # K = 18; B = 4K = 72
    seeds = torch.randperm(4 * clusters, generator=torch.Generator().manual_seed(3))[:clusters].sort().values
    for layer in range(2):
        kept = reference_importance(observation, layer).topk(4 * clusters, dim=-1).indices.sort(dim=-1).values
        keys = torch.stack([observation.keys[layer][h, kept[h]] for h in range(2)])
        values = torch.stack([observation.values[layer][h, kept[h]] for h in range(2)])
        expected = merge(keys, values, torch.ones(2, 4 * clusters, dtype=torch.int64), seeds, rule, 0.01)
        prefix = cache.layers[layer].prefix.materialize()
        torch.testing.assert_close(prefix.keys, expected.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(prefix.values, expected.values, rtol=0, atol=1e-6)
        torch.testing.assert_close(prefix.bias, expected.counts.double().log().float())
    assert not torch.equal(cache.layers[0].prefix.keys, cache.layers[1].prefix.keys)


@pytest.fixture(scope="module")
def loaded(model):
    return LoadedModel("tiny", "memory", model, None, torch.device("cpu"), torch.float32)


def test_budget_one_equals_full_through_the_chunked_prefill(loaded):
    """Also while decoding: the answer passes t = 160 and 192 with more than B = N entries, and nothing is pruned."""
    context, question = random_ids(150, seed=8), random_ids(4, seed=9)
    shared = TimedObservation(prefill(loaded.model, context, ObservationNeeds()), 0.0)
    full = run_cell(loaded, shared, get_method("full"), 1.0, question, 40, keep_logits=True)
    method = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK)
    ours = run_cell(loaded, None, method, 1.0, question, 40, keep_logits=True, context_ids=context)
    assert ours.token_ids == full.token_ids and ours.kv_bytes == full.kv_bytes_full
    for a, b in zip(ours.step_logits, full.step_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(cluster=False), dict(merge_bias=False), dict(centroid_rule="batch_mean", scope="per_layer_head")],
)
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_measured_bytes_meet_the_budget_after_streaming(model, options, budget):
    ids = random_ids(300, seed=10)
    cache, _ = AttentionClustering(pruning_interval=64, lookback_window=LOOKBACK, **options).prefill_and_compress(
        model, ids, budget
    )
    full_bytes = prefill(model, ids, ObservationNeeds()).kv_bytes_full()
    assert budget - 0.02 <= cache.kv_bytes() / full_bytes <= budget
    assert all(layer.prefix.materialize().bias is None for layer in cache.layers) == (
        options.get("cluster") is False or options.get("merge_bias") is False
    )


def test_a_budget_without_a_centroid_is_refused_in_one_line(model):
    with pytest.raises(BudgetError, match="raise the budget") as refusal:
        AttentionClustering().prefill_and_compress(model, random_ids(100, seed=11), 0.005)
    assert "\n" not in str(refusal.value)


def test_it_cannot_compress_a_shared_prefill_where_it_prunes_while_prefilling(model):
    ids = random_ids(200, seed=12)
    observation = prefill(model, ids, ObservationNeeds())
    method = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK)
    assert method.prefills_itself(model.config, 200, 0.1)  # K = 18, B = 72 < 200: prunes every 32 tokens
    with pytest.raises(RuntimeError, match="prefill_and_compress"):
        method.compress(observation, 0.1)


@pytest.mark.parametrize("budget", [0.3, 0.5, 1.0])
def test_where_nothing_is_pruned_before_the_end_the_shared_prefill_gives_the_same_cache(model, budget):
    """B = min(N, 4K) = N: the stream is one pass, the shared prefill's forward; its merge is replayed bit for bit."""
    ids = random_ids(200, seed=13)
    method = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK)
    assert not method.prefills_itself(model.config, 200, budget)
    own, _ = method.prefill_and_compress(model, ids, budget)
    shared = method.compress(prefill(model, ids, ObservationNeeds(window=8, column_sums=True)), budget)
    for layer, prefix in zip(own.layers, shared, strict=True):
        mine = layer.prefix
        assert torch.equal(mine.keys, prefix.keys) and torch.equal(mine.values, prefix.values)
        assert (mine.bias is None) == (prefix.bias is None) == (budget == 1.0)
        assert mine.bias is None or torch.equal(mine.bias, prefix.bias)


@pytest.mark.parametrize(
    "options",
    [dict(centroid_rule="median"), dict(scope="global"), dict(kmeans_rate=1.0), dict(pruning_interval=0)],
)
def test_invalid_options_are_refused(options):
    with pytest.raises(KVBenchError) as refusal:  # a user error, in one line
        AttentionClustering(**options)
    assert "\n" not in str(refusal.value)


def stored_entries(cache):
    first = cache.layers[0]
    return first.prefix.head_lengths()[0] + first.tail_length


@pytest.mark.parametrize(
    "options, budget, keep, clusters",
    [
        # N = 64: K = ⌊0.1·64·128/136⌋ = 6, B = 4K = 24.
        (dict(), 0.1, 24, 6),
        # Prune only: B = K = 16.
        (dict(cluster=False), 0.25, 16, 16),
    ],
)
def test_decoding_prunes_and_merges_whenever_t_passes_a_multiple_of_P_over_B(model, options, budget, keep, clusters):
    P, steps = 16, 70
    context, question = random_ids(64, seed=14), random_ids(5, seed=15)
    method = AttentionClustering(pruning_interval=P, lookback_window=LOOKBACK, **options)
    cache, logits = method.prefill_and_compress(model, context, budget)
    assert stored_entries(cache) == clusters
    seen, lookbacks = [], []

    def step_hook(cache, step):
        method.on_decode_step(cache, step)
        seen.append((cache.get_seq_length(), stored_entries(cache)))
        tail = cache.layers[0].tail_length
        recent = cache.method_state.recent_queries
        lookbacks.append((0 if recent is None else recent[0].shape[1], min(LOOKBACK, tail)))
        # Counts are kept only where they differ from 1: after a merge with the bias.
        assert len(cache.method_state.counts) == (0 if "cluster" in options else 2)
        if tail == 0:  # just pruned: every layer's prefix holds what was kept, biased by ln(count) when merged
            for layer, counts in cache.method_state.counts.items():
                prefix = cache.layers[layer].prefix.materialize()
                assert counts.shape == (2, clusters)
                assert (prefix.bias is None) == ("cluster" in options)
                assert prefix.bias is None or torch.equal(prefix.bias, counts.double().log().float())

    greedy_decode(
        model, cache, question, steps, [], first_logits=logits, step_hook=step_hook, start_hook=method.on_decode_start
    )
    # The rule, step by step: the question adds 5 raw tokens; each step one more; when t passes a multiple of P
    # with more than B entries stored, prune to B and merge to K.
    expected, size, position = [], clusters + len(question), len(context) + len(question)
    for _ in range(steps - 1):
        size, t = size + 1, position + 1
        if t // P > position // P and size > keep:
            size = clusters
        position = t
        expected.append((t, size))
    assert seen == expected
    assert sum(size == clusters for _, size in seen) >= 2  # it pruned while decoding, more than once
    assert max(size for _, size in seen) <= keep + P
    # The lookback holds the queries of the last Δ tokens since the last prune.
    assert all(have == want for have, want in lookbacks)


def test_scoring_a_continuation_prunes_as_decoding_it_would(loaded):
    """Perplexity/loglikelihood cells feed attention_clustering token by token through its hooks: scoring the
    answer it generated reproduces the log-probabilities it generated it with, prunes included."""
    context, question = random_ids(64, seed=16), random_ids(5, seed=17)
    method = AttentionClustering(pruning_interval=16, lookback_window=LOOKBACK)
    assert method.acts_while_decoding
    decoded = run_cell(loaded, None, method, 0.1, question, 40, keep_logits=True, context_ids=context)
    assert len(decoded.token_ids) == 40  # t ran from 69 to 109: a prune fired at t = 96 (6 + 32 > B = 24)
    other = random_ids(6, seed=18)
    ((_, _, cell),) = iter_scoring_cells(loaded, context, question, [other, decoded.token_ids], [(method, 0.1)])
    expected = [
        torch.log_softmax(step, dim=-1)[token].item() for step, token in zip(decoded.step_logits, decoded.token_ids)
    ]
    assert cell.scores[1].greedy and cell.scores[1].logprobs == expected


def test_each_cache_decodes_with_its_own_stream(model):
    """The stream travels with the cache: compressing a second context does not disturb decoding the first,
    through prunes and merges while decoding."""
    method = AttentionClustering(pruning_interval=16, lookback_window=LOOKBACK)
    question = random_ids(5, seed=21)

    def answer(compressed):
        cache, logits = compressed
        hooks = dict(step_hook=method.on_decode_step, start_hook=method.on_decode_start)
        generation = greedy_decode(model, cache, question, 40, [], first_logits=logits, keep_logits=True, **hooks)
        return generation.token_ids, torch.stack(generation.step_logits)

    contexts = random_ids(64, seed=19), random_ids(64, seed=20)
    alone = [answer(method.prefill_and_compress(model, ids, 0.1)) for ids in contexts]
    first, second = (method.prefill_and_compress(model, ids, 0.1) for ids in contexts)
    assert first[0].method_state is not second[0].method_state
    for (tokens, logits), (tokens_alone, logits_alone) in zip([answer(first), answer(second)], alone, strict=True):
        assert tokens == tokens_alone and torch.equal(logits, logits_alone)
    assert not torch.equal(alone[0][1], alone[1][1])


def test_kv_bytes_after_compression_are_the_hand_count(model):
    """Per layer and KV head: K centroids of key, value (2·d fp32) and bias (fp32), plus their int32 counts in the
    stream, the cache's decode state; the lookback queries are dropped at the end of the context."""
    n, budget, h_kv, d = 160, 0.1, 2, 16
    cache, _ = AttentionClustering(pruning_interval=32, lookback_window=LOOKBACK).prefill_and_compress(
        model, random_ids(n, seed=3), budget
    )
    clusters = 15  # ⌊0.1·160·128/136⌋
    per_layer = h_kv * clusters * (2 * d * 4 + 4) + h_kv * clusters * 4
    assert per_layer == 4080
    assert cache.kv_bytes() == 2 * per_layer  # 8,160 of the full 81,920
    assert cache.method_state.recent_queries is None and cache.method_state.log is None
    # From the shared prefill (B ≥ N: one pass), the same count: N = 200 at b = 0.3 keeps K = ⌊60·128/136⌋ = 56.
    ids = random_ids(200, seed=13)
    prefixes = AttentionClustering(pruning_interval=32).compress(prefill(model, ids, ObservationNeeds()), 0.3)
    cache = KVBenchCache(2, prefixes, 200)
    assert cache.kv_bytes() == 2 * (h_kv * 56 * (2 * d * 4 + 4) + h_kv * 56 * 4)


@pytest.mark.parametrize("context", [37, 1000, 2047])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("options", [dict(), dict(cluster=False), dict(merge_bias=False)])
def test_nothing_kept_exceeds_the_budget(model, context, budget, options):
    """Keys and values alone stay within b of the full cache, and so do they with biases and counts."""
    ids = random_ids(context, seed=22)
    cache, _ = AttentionClustering(pruning_interval=256, **options).prefill_and_compress(model, ids, budget)
    full_bytes = 2 * 2 * context * 2 * 16 * 4
    token_bytes = sum(sum(layer.prefix.head_lengths()) for layer in cache.layers) * 2 * 16 * 4
    assert token_bytes <= budget * full_bytes and cache.kv_bytes() <= budget * full_bytes


def test_scoring_feeds_continuations_in_one_pass_where_no_prune_can_fire(loaded, monkeypatch):
    """Stepwise scoring recompresses the context per continuation; it is needed only where a prune could fire."""
    context, question = random_ids(64, seed=16), random_ids(5, seed=17)
    method = AttentionClustering(pruning_interval=16, lookback_window=LOOKBACK)
    prefills, original = [], method.prefill_and_compress
    monkeypatch.setattr(method, "prefill_and_compress", lambda *args: prefills.append(1) or original(*args))
    short, long = random_ids(6, seed=18), random_ids(40, seed=19)
    # t = 64 + 5 + 6 = 75 passes no multiple of P = 16 after the context: one compression serves both.
    list(iter_scoring_cells(loaded, context, question, [short, short], [(method, 0.1)]))
    assert len(prefills) == 1
    # t reaches 109, past 80 and 96 with 6 + 45 > B = 24 entries: each continuation gets its own, stepwise.
    prefills.clear()
    list(iter_scoring_cells(loaded, context, question, [short, long], [(method, 0.1)]))
    assert len(prefills) == 2

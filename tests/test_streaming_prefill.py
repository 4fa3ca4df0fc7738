"""The seam for methods that change the prefill itself: chunked prefill with compression between chunks."""

from dataclasses import dataclass

import torch
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import TokenPrefix
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.prefill import ObservationNeeds, prefill, streaming_prefill
from kvbench.methods.base import Method


def seen_so_far(layer):
    """Keys and values of everything a layer holds: its (uniform) prefix, then its tail."""
    keys, values = layer.keys[0], layer.values[0]
    if layer.prefix is not None:
        kv = layer.prefix.materialize()
        keys, values = torch.cat([kv.keys, keys], dim=1), torch.cat([kv.values, values], dim=1)
    return keys, values


def keep_everything(cache, index, queries, scaling):
    for layer in cache.layers:
        layer.absorb_tail(TokenPrefix(*seen_so_far(layer)))


def test_chunked_prefill_without_compression_equals_one_pass():
    model = tiny_model("qwen2-gqa")
    context, question = random_ids(100, seed=1), random_ids(4, seed=2)
    seen_chunks = []

    def hook(cache, index, queries, scaling):
        seen_chunks.append((index, queries[0].shape[1], scaling))
        keep_everything(cache, index, queries, scaling)

    cache, logits = streaming_prefill(model, context, 32, hook)
    scale = model.model.layers[0].self_attn.scaling
    assert seen_chunks == [(0, 32, scale), (1, 32, scale), (2, 32, scale), (3, 4, scale)]
    observation = prefill(model, context, ObservationNeeds())
    torch.testing.assert_close(logits, observation.last_logits, rtol=0, atol=1e-5)
    for layer, keys in zip(cache.layers, observation.keys):
        torch.testing.assert_close(layer.prefix.materialize().keys, keys, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 100 and cache.kv_bytes() == observation.kv_bytes_full()
    full = KVBenchCache(
        observation.num_layers, [TokenPrefix(k, v) for k, v in zip(observation.keys, observation.values)], 100
    )
    a = greedy_decode(model, cache, question, 6, [], keep_logits=True)
    b = greedy_decode(model, full, question, 6, [], keep_logits=True)
    assert a.token_ids == b.token_ids


@dataclass(frozen=True)
class RecentConfig:
    """A toy streaming method for the seam test: keep only the last `budget` share after every chunk."""

    chunk: int = 16


class RecentWhilePrefilling(Method):
    name = "recent_while_prefilling"
    family = "test"
    description = "test-only"
    Config = RecentConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(own_prefill=True)

    def _compress(self, observation, budget):
        raise AssertionError("own-prefill methods are not compressed from a shared observation")

    def prefill_and_compress(self, model, input_ids, budget):
        keep = max(1, int(len(input_ids) * budget))

        def hook(cache, index, queries, scaling):
            for layer in cache.layers:
                keys, values = seen_so_far(layer)
                layer.absorb_tail(TokenPrefix(keys[:, -keep:], values[:, -keep:]))

        return streaming_prefill(model, input_ids, self.config.chunk, hook)


def test_own_prefill_methods_run_through_the_pipeline():
    from kvbench.harness.engine.pipeline import run_context
    from kvbench.harness.models.loading import LoadedModel

    model = tiny_model("llama-gqa")
    loaded = LoadedModel("tiny", "memory", model, None, torch.device("cpu"), torch.float32)
    context = random_ids(80, seed=3)
    (result,) = run_context(loaded, context, random_ids(3, seed=4), [(RecentWhilePrefilling(), 0.25)], 5)
    assert result.kv_bytes / result.kv_bytes_full == 20 / 80
    assert result.compress_s == 0.0 and result.prefill_s > 0 and result.new_tokens == 5

"""TOVA: keep the tokens the current query attends to, one token set per layer
(Oren et al., arXiv 2401.06104; kvpress's TOVAPress)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.harness.cache.kv_cache import CompressedLayer, KVBenchCache
from kvbench.harness.cache.prefix import Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import (
    decode_attention,
    gather_heads,
    tokens_for_budget,
    top_indices,
    window_attention,
)
from kvbench.methods.common.query_log import QueryLog, attach_query_log, logged_state


@dataclass(frozen=True)
class TOVAConfig:
    """arXiv 2401.06104 with kvpress's prefill variant: the last context query's attention (softmax over all N
    keys), averaged over all heads of the layer, so every KV head keeps the same int(b·N) tokens; the last token
    is protected.

    decode_evict: the paper's decode-time TOVA: after each generated token the layer drops its single token
    with the lowest attention from that token's query (mean over all heads; the newest token is never
    dropped), so the cache keeps the size it had when generation began (its budget plus the question). At
    b = 1 the context is not compressed and nothing is evicted while decoding either.
    """

    decode_evict: bool = False


def tova_scores(observation: Observation, layer: int, config: TOVAConfig, n_kept: int) -> torch.Tensor:
    """The last query's attention averaged over every query head, the same row for each KV head: [H_kv, N];
    the last token is protected (+inf). n_kept is unused (no budget-dependent protection)."""
    row = window_attention(observation, layer, 1)[:, 0].mean(dim=0)
    row[-1] = float("inf")
    return row.expand(observation.num_kv_heads, -1)


@dataclass
class TOVADecodeState:
    """One sequence's decode-time TOVA state, in its cache's `method_state`: nothing per token (the score is
    recomputed from the newest query at each step). log: the decode cache's query recorder, attached by
    `on_decode_start`; size: the tokens per head held while decoding, fixed at the first step."""

    layers: int
    scaling: float
    log: QueryLog | None = None
    size: int | None = None


@register
class TOVA(Method):
    name = "tova"
    family = "token eviction (per layer)"
    description = "Keeps the tokens the last query attends to most, averaged over all heads (one set per layer)"
    Config = TOVAConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=1)

    def _compress(self, observation: Observation, budget: float) -> Prefixes:
        n = observation.context_length
        n_kept = tokens_for_budget(n, budget)
        prefixes = []
        for layer in range(observation.num_layers):
            # One row selects for every head, so no tie can split the heads' sets.
            row = tova_scores(observation, layer, self.config, n_kept)[:1]
            prefixes.append(
                gather_heads(observation, layer, top_indices(row, n_kept).expand(observation.num_kv_heads, -1))
            )
        state = TOVADecodeState(observation.num_layers, observation.scaling) if self.config.decode_evict else None
        return Prefixes(prefixes, decode_state=state if n_kept < n else None)

    @property
    def acts_while_decoding(self) -> bool:
        return self.config.decode_evict

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        return cache.method_state is not None

    def on_decode_start(self, cache: KVBenchCache) -> None:
        if cache.method_state is not None:
            attach_query_log(cache, list(range(cache.method_state.layers)))

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Drop each layer's least attended token, so the cache keeps the size it had when generation began."""
        state = logged_state(cache, self.name)
        if state is None:
            return
        for layer, cached in enumerate(cache.layers):
            self._evict(state, layer, cached)

    def _evict(self, state: TOVADecodeState, layer: int, cached: CompressedLayer) -> None:
        newest = state.log.take(layer)[:, -1:]
        prefix = cached.prefix.materialize()
        keys = torch.cat([prefix.keys, cached.keys[0]], dim=1)
        values = torch.cat([prefix.values, cached.values[0]], dim=1)
        if state.size is None:
            state.size = keys.shape[1] - 1
        if keys.shape[1] > state.size:
            scores = decode_attention(newest, keys, state.scaling)[:, :, 0].mean(dim=(0, 1))
            scores[-1] = float("inf")
            keep = scores.topk(state.size).indices.sort().values
            keys, values = keys[:, keep], values[:, keep]
        cached.absorb_tail(TokenPrefix(keys, values))

"""H2O / observed attention: keep the heavy hitters, the tokens that received the most attention
(Zhang et al., arXiv 2306.14048; kvpress's ObservedAttentionPress)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.harness.cache.kv_cache import CompressedLayer, KVBenchCache
from kvbench.harness.cache.prefix import Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.budget import kv_cost
from kvbench.methods.common.eviction import decode_attention, gather_heads, group_mean, tokens_for_budget, top_indices
from kvbench.methods.common.query_log import QueryLog, attach_query_log, logged_state


@dataclass(frozen=True)
class H2OConfig:
    """arXiv 2306.14048 with kvpress's defaults (ObservedAttentionPress): compress once after the prefill, no
    recent window, scores normalised.

    normalize: s_j = Σ_i A[i, j] / (N − j), the mean attention over the queries that can see token j (kvpress),
        which removes the causal mask's bias toward early tokens; false gives the paper's raw sums.
    recent_ratio: share of the int(b·N) kept tokens reserved for the most recent ones; the paper's official code
        (heavy_ratio = recent_ratio = 0.1 of the sequence) is recent_ratio = 0.5, kvpress has none (0).
    decode_evict: the paper's decode-time H2O: every generated token's attention row is added to the scores and
        each head then evicts its lowest-scoring token, so the cache keeps the size it had when generation began
        (its budget plus the question). The newest token and the recent share are never evicted. At b = 1 the
        context is not compressed and nothing is evicted while decoding either. The scores it carries (fp32,
        and int32 positions when normalised) are cache and come out of the budget: each head keeps the most
        tokens whose keys, values and scores together fit b of the full cache, fewer than int(b·N).

    Scores come from the prefill's chunked column sums (never an N×N matrix) and are averaged over each KV
    head's query group.
    """

    normalize: bool = True
    recent_ratio: float = option(0.0, at_least=0, at_most=1)
    decode_evict: bool = False


def h2o_scores(observation: Observation, layer: int, config: H2OConfig, n_kept: int) -> torch.Tensor:
    """Accumulated (or, normalised, mean) attention each token received, group-averaged: [H_kv, N]; the most
    recent int(n_kept · recent_ratio) tokens are protected (+inf)."""
    if observation.column_sums is None:
        raise ValueError("the prefill did not collect attention column sums; declare column_sums in needs()")
    sums = observation.column_sums[layer]
    n = sums.shape[-1]
    if config.normalize:
        sums = sums / torch.arange(n, 0, -1, device=sums.device, dtype=sums.dtype)
    scores = group_mean(sums, observation.num_kv_heads)
    n_recent = int(n_kept * config.recent_ratio)
    if n_recent:
        scores[:, n - n_recent :] = float("inf")
    return scores


# What the decode state holds per kept token of a head: its score (the prefill's column sums are fp32) and, when
# scores are normalised, its position.
SCORE_BYTES = torch.float32.itemsize
POSITION_BYTES = torch.int32.itemsize


@dataclass
class H2ODecodeState:
    """One sequence's decode-time H2O state, in its cache's `method_state` (where `kv_bytes` counts it).

    accumulated: per layer, [H_kv, n] fp32 raw attention sums of the stored tokens, in stored (position) order,
    averaged over each query group. positions: per layer, [H_kv, n] int32 positions of the stored tokens, only
    when scores are normalised (the number of queries that saw token j is the sequence length minus its
    position); raw sums need none. recent: the most recent stored tokens that are never evicted (at least the
    newest). log: the decode cache's query recorder, attached by `on_decode_start`. size: the tokens per head
    held while decoding, fixed at the first step.
    """

    accumulated: list[torch.Tensor]
    positions: list[torch.Tensor] | None
    recent: int
    scaling: float
    log: QueryLog | None = None
    size: int | None = None


@register
class H2O(Method):
    name = "h2o"

    @property
    def version(self) -> int:
        """2: with decode_evict the scores it keeps for decoding are paid from the budget. Without it h2o keeps
        what it always kept, so those rows keep version 1 and committed stores resume."""
        return 2 if self.config.decode_evict else 1

    family = "token eviction"
    description = "Keeps the tokens that received the most attention in the prefill (heavy hitters, per KV head)"
    Config = H2OConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(column_sums=True)

    def _compress(self, observation: Observation, budget: float) -> Prefixes:
        n = observation.context_length
        n_kept = self._tokens_per_head(observation, budget)
        prefixes, accumulated, positions = [], [], []
        for layer in range(observation.num_layers):
            kept = top_indices(h2o_scores(observation, layer, self.config, n_kept), n_kept).sort(dim=-1).values
            prefixes.append(gather_heads(observation, layer, kept))
            if self.config.decode_evict:
                raw = group_mean(observation.column_sums[layer], observation.num_kv_heads)
                accumulated.append(raw.gather(1, kept))
                positions.append(kept.to(torch.int32))
        state = None
        if self.config.decode_evict and n_kept < n:
            recent = max(int(n_kept * self.config.recent_ratio), 1)
            state = H2ODecodeState(
                accumulated, positions if self.config.normalize else None, recent, observation.scaling
            )
        return Prefixes(prefixes, decode_state=state)

    def _tokens_per_head(self, observation: Observation, budget: float) -> int:
        """int(b·N); with decode_evict, the most tokens whose keys, values and decode state (`H2ODecodeState`:
        an fp32 score per kept token, and an int32 position when normalised) fit b of the full cache."""
        n = observation.context_length
        if not self.config.decode_evict:
            return tokens_for_budget(n, budget)
        per_head = SCORE_BYTES + (POSITION_BYTES if self.config.normalize else 0)
        return kv_cost(observation, state_per_head=per_head).kept(self.label, n, budget)

    @property
    def acts_while_decoding(self) -> bool:
        return self.config.decode_evict

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        return cache.method_state is not None

    def on_decode_start(self, cache: KVBenchCache) -> None:
        """The scores need the attention of the question's queries too: record from the first forward on."""
        if cache.method_state is not None:
            attach_query_log(cache, list(range(len(cache.method_state.accumulated))))

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Add the new tokens' attention to the scores, then evict down to the size held when generation began."""
        state = logged_state(cache, self.name)
        if state is None:
            return
        for layer, cached in enumerate(cache.layers):
            self._evict(state, layer, cached)

    def _evict(self, state: H2ODecodeState, layer: int, cached: CompressedLayer) -> None:
        queries = state.log.take(layer)
        prefix = cached.prefix.materialize()
        tail_keys, tail_values = cached.keys[0], cached.values[0]
        new = tail_keys.shape[1]
        if queries.shape[1] != new:
            raise RuntimeError(f"h2o saw {queries.shape[1]} new queries for {new} new tokens in layer {layer}")
        keys = torch.cat([prefix.keys, tail_keys.to(prefix.keys.dtype)], dim=1)
        values = torch.cat([prefix.values, tail_values.to(prefix.values.dtype)], dim=1)
        received = decode_attention(queries, keys, state.scaling).mean(dim=1).sum(dim=1)
        accumulated = torch.cat([state.accumulated[layer], received.new_zeros(keys.shape[0], new)], dim=1) + received
        seen = cached.get_seq_length()
        positions = None
        if state.positions is not None:
            latest = torch.arange(seen - new, seen, dtype=torch.int32, device=keys.device).expand(keys.shape[0], -1)
            positions = torch.cat([state.positions[layer], latest], dim=1)
        if state.size is None:
            state.size = keys.shape[1] - 1
        if keys.shape[1] > state.size:
            scores = accumulated / (seen - positions) if positions is not None else accumulated.clone()
            scores[:, -state.recent :] = float("inf")
            keep = scores.topk(state.size, dim=-1).indices.sort(dim=-1).values
            index = keep[..., None].expand(-1, -1, keys.shape[-1])
            keys, values = keys.gather(1, index), values.gather(1, index)
            accumulated = accumulated.gather(1, keep)
            positions = positions.gather(1, keep) if positions is not None else None
        state.accumulated[layer] = accumulated
        if positions is not None:
            state.positions[layer] = positions
        cached.absorb_tail(TokenPrefix(keys, values))

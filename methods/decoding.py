"""Any scorer while decoding: compress the context and, every `interval` generated tokens, the whole cache (context
and generated tokens) back to the budget by a base scorer's ranking (kvpress's DecodingPress, arXiv 2510.00636).

Reasoning models write thousands of tokens after a short prompt: there the cache grows while decoding and
compressing only the prefill does nothing. `decoding:base=snapkv:interval=128` keeps it bounded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from kvbench.harness.cache.kv_cache import CompressedLayer, KVBenchCache
from kvbench.harness.cache.prefix import Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import BudgetError, Unsupported, check_budget
from kvbench.harness.method_spec import option
from kvbench.harness.token_budget import budget_tokens
from kvbench.methods.base import Method, register
from kvbench.methods.common.budget import kv_cost
from kvbench.methods.common.eviction import gather_heads, top_indices
from kvbench.methods.common.query_log import attach_query_log, logged_state
from kvbench.methods.common.scorers import Scorer, canonical_options, get_scorer

# The base scorers whose inputs exist while decoding: the keys and values in the cache, and the queries of the
# tokens fed after the context (a window of them, kept in the decode state).
DECODE_SCORERS = ("snapkv", "tova", "knorm")


@dataclass(frozen=True)
class DecodingConfig:
    """kvpress's DecodingPress (arXiv 2510.00636, kvpress/presses/generation): a scorer press applied every
    `compression_interval` generated tokens to the whole cache, keys and values as they are then.

    base: the scorer (snapkv, tova, knorm) with its own defaults unless `base_options` sets some
        (`option=value/option=value`, e.g. `base_options=window=32`). It reads at each compression what it reads at
        prefill, from the decode so far: snapkv the last `window` queries fed (question and generated tokens),
        tova the newest one, knorm the keys alone. Any other base is refused in one line (not among the choices):
        h2o's scores are the attention every query gave since the prefill (h2o:decode_evict=true is its own
        decode-time form), expected_attention reads the context's hidden states through the model, which decoding
        does not keep, and the quantizing methods (kivi, the autoencoder) encode tokens rather than rank them; the
        wrapper does not quantize an aging tail.
    interval: generated tokens between compressions. The budget is a ceiling at every step, raw tail included
        (kvpress's DecodingPress lets the cache grow `interval` tokens past its target between compressions; kvbench
        does not): once the cache would hold more tokens per head than the budget allows (T), it is compressed to
        T − interval + 1, so that it refills to T over the next `interval` tokens. An interval above T is refused
        in one line.

    The budget covers context and generated tokens together: a token budget `Tt` allows T tokens per KV head, a
    fraction b allows b of the context's full bytes (b = 1 keeps everything and never compresses, as `full`). The
    decode state (the base's window of queries, preallocated) is paid from it (issue 33), so the cache keeps the
    most tokens per head whose keys, values and state fit.
    """

    base: str = option("snapkv", choices=("snapkv", "tova", "knorm"))  # DECODE_SCORERS
    base_options: str = ""
    interval: int = option(128, at_least=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_options", canonical_options(self.base, self.base_options))


@dataclass
class DecodingState:
    """One sequence's decode-time state, in its cache's `method_state` (where `kv_bytes` counts it).

    target: the most tokens per head the budget allows (T); interval: tokens between compressions, each of which
    keeps T − interval + 1.
    queries: per layer, the last `window` post-RoPE queries fed ([H_q, window, d], preallocated and paid from the
    budget; none for a base that reads no query); filled: how many of them are real. log: the decode cache's
    query recorder, attached by `on_decode_start`; compressions: how many times the cache was compressed."""

    target: int
    interval: int
    scaling: float
    queries: list[torch.Tensor] | None
    filled: int = 0
    log: object | None = None
    compressions: int = 0


def decode_observation(
    keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scaling: float
) -> Observation:
    """One layer of a cache, as the base scorer reads a prefill: its stored keys and values ([H_kv, n, d], in
    position order) and the queries of its last stored tokens ([H_q, w, d], oldest first)."""
    return Observation(
        input_ids=torch.zeros(keys.shape[1], dtype=torch.long),
        keys=[keys],
        values=[values],
        scaling=scaling,
        last_logits=keys.new_empty(0),
        window_queries=[queries] if queries is not None else None,
    )


def decode_choice(
    scorer: Scorer, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scaling: float, kept: int
) -> torch.Tensor:
    """[H_kv, kept] indices, in position order, that the base keeps of a layer's stored tokens given the queries
    of its last tokens: its prefill ranking over these keys and queries (a window shorter than the base's reads
    what there is)."""
    config = scorer.config
    available = 0 if queries is None else int(queries.shape[1])
    if hasattr(config, "window") and config.window > available:
        config = dataclasses.replace(config, window=max(available, 1))
    observation = decode_observation(keys, values, queries, scaling)
    scores = scorer.score(observation, 0, config, kept)
    return top_indices(scores, kept).sort(dim=-1).values


@register
class Decoding(Method):
    name = "decoding"
    family = "token eviction (while decoding)"
    description = "Any scorer, applied every `interval` generated tokens to context and answer together"
    Config = DecodingConfig
    # 2: the budget is a ceiling at every step (compressed to T − interval + 1); 1 (the branch's first form, the
    # store results/smollm2-135m/decoding-chain-900) compressed back to T and grew up to `interval` tokens past it.
    version = 2

    @property
    def label(self) -> str:
        """The base is always named (`decoding:base=snapkv:...`), default or not: a report line says which scorer
        it wraps."""
        label = super().label
        if self.config.base != type(self.config)().base:  # non-default: named already
            return label
        return label.replace(self.name, f"{self.name}:base={self.config.base}", 1)

    @property
    def scorer(self) -> Scorer:
        return get_scorer(self.config.base, self.config.base_options)

    def needs(self) -> ObservationNeeds:
        return self.scorer.needs()

    @property
    def acts_while_decoding(self) -> bool:
        return True

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        return cache.method_state is not None

    def compress(self, observation: Observation, budget: float) -> Prefixes:
        """As `Method.compress`, keeping what a token budget says: T tokens per head for the whole generation."""
        tokens = budget_tokens(budget)
        fraction = check_budget(float(budget))
        sliding = [layer for layer, a in enumerate(observation.attention or []) if a is not None and a.window]
        if sliding or observation.windowed_layers():
            raise Unsupported(
                f"{self.label} rewrites every layer while decoding, which would rewrite this model's sliding-window "
                "layers; kvbench does not run it on models with sliding windows yet"
            )
        return self._compress_to(observation, fraction, tokens)

    def _compress(self, observation: Observation, budget: float) -> Prefixes:
        return self._compress_to(observation, budget, None)

    def _window(self, observation: Observation) -> int:
        return self.scorer.needs().window

    def _compress_to(self, observation: Observation, fraction: float, tokens: int | None) -> Prefixes:
        n = observation.context_length
        if tokens is None and fraction >= 1.0:  # b = 1: everything, never compressed (as full)
            return Prefixes([TokenPrefix(k, v, first_position=0) for k, v in zip(observation.keys, observation.values)])
        window = self._window(observation)
        queries = None
        fixed = 0
        if window:
            shape = observation.window_queries[0].shape
            dtype = observation.window_queries[0].dtype
            queries = [
                torch.zeros(shape[0], window, shape[2], dtype=dtype, device=observation.keys[0].device)
                for _ in range(observation.num_layers)
            ]
            fixed = sum(q.numel() * q.element_size() for q in queries)
        cost = kv_cost(observation, fixed=fixed)
        ceiling = tokens if tokens is not None else fraction * n  # tokens per head's worth of bytes allowed
        most = tokens if tokens is not None else int(fraction * n)
        target = min(most, max(0, math.floor((ceiling * cost.kv - fixed) / cost.kv)))
        while target and cost.held(target) > ceiling * cost.kv:
            target -= 1
        if target < 1:
            lowest = f"{math.ceil(fixed / cost.kv) + 1}t" if tokens is not None else f"{cost.lowest_budget(n, 1):g}"
            raise BudgetError(
                f"{self.label} at budget {tokens if tokens is not None else fraction:g}{'t' if tokens else ''} keeps "
                f"no token once its window of queries ({fixed:,} bytes) is paid; the lowest reachable budget is "
                f"{lowest}"
            )
        interval = self.config.interval
        if interval > target:
            lowest = (
                f"{interval + math.ceil(fixed / cost.kv)}t"
                if tokens is not None
                else f"{cost.lowest_budget(n, interval):g}"
            )
            raise BudgetError(
                f"{self.label}: interval {interval} is more than the {target} tokens per head that budget "
                f"{tokens if tokens is not None else fraction:g}{'t' if tokens else ''} allows on this context; the "
                f"lowest reachable budget at this interval is {lowest} (or use interval <= {target})"
            )
        kept = min(n, target)
        scorer = self.scorer
        prefixes = []
        for layer in range(observation.num_layers):
            if kept == n:
                prefixes.append(TokenPrefix(observation.keys[layer], observation.values[layer], first_position=0))
                continue
            indices = top_indices(scorer.scores(observation, layer, kept), kept).sort(dim=-1).values
            prefixes.append(gather_heads(observation, layer, indices))
        state = DecodingState(target, self.config.interval, observation.scaling, queries)
        return Prefixes(prefixes, decode_state=state)

    def on_decode_start(self, cache: KVBenchCache) -> None:
        state = cache.method_state
        if state is not None and state.queries is not None:
            attach_query_log(cache, list(range(len(cache.layers))))

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Keep the newest queries; once the cache holds more tokens per head than the target T, compress every
        layer to T − interval + 1 by the base's ranking."""
        state = cache.method_state
        if state is None:
            return
        if state.queries is not None:
            state = logged_state(cache, self.name)
            for layer, buffer in enumerate(state.queries):
                newest = state.log.take(layer)
                window = buffer.shape[1]
                merged = torch.cat([buffer, newest.to(buffer.dtype)], dim=1)[:, -window:]
                buffer.copy_(merged)  # in place: the state's storage, paid at compression, never grows
            state.filled = min(window, state.filled + int(newest.shape[1]))
        size = max(cache.layers[0].prefix.head_lengths()) + cache.layers[0].tail_length
        if size <= state.target:
            return
        scorer = self.scorer
        for layer, cached in enumerate(cache.layers):
            self._recompress(scorer, state, layer, cached)
        state.compressions += 1

    def _recompress(self, scorer: Scorer, state: DecodingState, layer: int, cached: CompressedLayer) -> None:
        prefix = cached.prefix.materialize()
        keys = torch.cat([prefix.keys, cached.keys[0].to(prefix.keys.dtype)], dim=1)
        values = torch.cat([prefix.values, cached.values[0].to(prefix.values.dtype)], dim=1)
        queries = None
        if state.queries is not None and state.filled:
            queries = state.queries[layer][:, state.queries[layer].shape[1] - state.filled :]
        keep = decode_choice(scorer, keys, values, queries, state.scaling, state.target - state.interval + 1)
        index = keep[..., None].expand(-1, -1, keys.shape[-1])
        cached.absorb_tail(TokenPrefix(keys.gather(1, index), values.gather(1, index)))

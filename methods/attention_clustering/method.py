"""Attention-guided pruning + online k-means merging while prefilling and decoding (seed 003,
specs/seed_methods.md (c)).

Every P tokens the cache is pruned to the B entries the last Δ queries attended to most, and the kept
entries are merged into K centroid pairs per layer and KV head, each with the logit bias ln(count).
Pruning changes what later tokens attend to, so the method runs its own chunked prefill; after the
context it goes on pruning every P tokens while the answer is decoded, so the cache stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.harness.cache.kv_cache import CompressedLayer, KVBenchCache
from kvbench.harness.cache.prefix import Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, streaming_prefill
from kvbench.harness.errors import BudgetError, check_budget
from kvbench.harness.method_spec import option
from kvbench.harness.models.loading import head_dim
from kvbench.methods.attention_clustering.kmeans import merge
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import group_mean, tokens_for_budget
from kvbench.methods.common.query_log import QueryLog, attach_query_log, logged_state

SCOPES = ("shared", "per_layer_head")
COUNT_DTYPE = torch.int32  # tokens a merged entry stands for: at most the context plus the answer


@dataclass(frozen=True)
class AttentionClusteringConfig:
    """Seed 003 (chchenhui/mlrbench, `iclr2025_scope`, an automatically generated paper; no arXiv id).

    Paper defaults: prune every P = 512 tokens (`pruning_interval`), importance from the last Δ = 256
    queries (`lookback_window`), k-means rate η = 0.01, importance shared by all layers and heads, B = 1024
    kept entries and K = 256 centroids. In kvbench the budget sets K = ⌊b·N·2d·e/((2d+1)·e + 4)⌋ for e-byte
    numbers (a centroid also stores its bias, and the sequence's state its int32 count), with B = min(N, 4·K)
    keeping the paper's B/K (`prune_per_cluster`); `cluster=False` is the prune-only ablation, where the
    budget sets B = ⌊b·N⌋. The lookback spans the chunks since the last prune; the end of the context always
    prunes and merges down to the budget. While decoding, the cache is pruned and merged again whenever the
    position t passes a multiple of P with more than B entries stored (at budget 1 nothing is ever pruned:
    that is the full cache).
    `centroid_rule="batch_mean"` replaces the paper's online update by the count-weighted member mean;
    `merge_bias=False` drops the ln(count) bias (paper parity: every stored entry then counts as one
    token). The seeded random init draws one permutation per merge, shared by every layer and head.
    The method compresses the model it is given; the paper's distillation fine-tuning, which teaches a model
    to read through this compression, is `kvbench train attention_clustering` (`train`).
    """

    pruning_interval: int = option(512, at_least=1)
    lookback_window: int = option(256, at_least=1)
    kmeans_rate: float = option(0.01, above=0, below=1)
    centroid_rule: str = option("online", choices=("online", "batch_mean"))  # kmeans.CENTROID_RULES
    scope: str = option("shared", choices=SCOPES)
    cluster: bool = True
    prune_per_cluster: int = option(4, at_least=1)
    merge_bias: bool = True
    seed: int = option(0, at_least=0)


@dataclass(frozen=True)
class EntryPlan:
    """Entries per KV head: `keep` (B) after a prune, `clusters` (K ≤ B) after a merge; K = B prunes only."""

    keep: int
    clusters: int


# Bytes of one number in the smallest cache dtype kvbench runs (bf16, fp16): where the dtype is not known yet,
# plans made with it keep no more entries than the real one.
SMALLEST_ELEMENT_SIZE = 2


def plan_entries(
    config: AttentionClusteringConfig, context_length: int, budget: float, head_dim: int, element_size: int
) -> EntryPlan:
    """Map the budget to B and K so the final cache holds at most b of the full bytes, biases and counts included.

    A token stores a key and a value, 2d numbers of `element_size` bytes. A centroid also stores its bias in the
    cache dtype and, in the sequence's decode state, its count (int32), which later merges weigh by; without
    the bias every count is 1 and none is kept.
    """
    n = context_length
    if budget >= 1.0:
        return EntryPlan(n, n)
    if not config.cluster:
        keep = tokens_for_budget(n, budget)
        return EntryPlan(keep, keep)
    token_bytes = 2 * head_dim * element_size
    centroid_bytes = token_bytes + (element_size + COUNT_DTYPE.itemsize if config.merge_bias else 0)
    clusters = math.floor(budget * n * token_bytes / centroid_bytes)
    if clusters < 1:
        raise BudgetError(f"budget {budget:g} leaves no centroid for a {n}-token context; raise the budget")
    return EntryPlan(min(n, config.prune_per_cluster * clusters), clusters)


def attention_importance(
    queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention each stored entry got from `queries` ([H_q, m, d], those of the last m entries): [H_kv, n] fp32.

    Recomputed as the model attended: over every stored entry with its logit bias (a merged token weighs
    like its members together) and causally among the last m entries. Summed over the query rows,
    averaged over each KV head's query group.
    """
    h_q, rows, dim = queries.shape
    h_kv, n = keys.shape[:2]
    grouped = queries.float().reshape(h_kv, (h_q // h_kv) * rows, dim)
    logits = (grouped @ keys.float().transpose(-1, -2)) * scaling
    if bias is not None:
        logits = logits + bias.float()[:, None, :]
    positions = torch.arange(n - rows, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > positions[:, None]
    logits = logits.reshape(h_q, rows, n).masked_fill(future, float("-inf"))
    return group_mean(torch.softmax(logits, dim=-1).sum(dim=1), h_kv)


def select_kept(importance: list[torch.Tensor], keep: int, scope: str) -> list[torch.Tensor]:
    """Per layer, the `keep` entries to retain per KV head ([H_kv, keep]), in their original order.

    "shared" (paper): one score summed over all layers and heads, so every head keeps the same entries;
    "per_layer_head": each layer and KV head keeps its own top entries.
    """
    if scope == "shared":
        top = torch.stack(importance).sum(dim=(0, 1)).topk(keep).indices.sort().values
        return [top.expand(scores.shape[0], -1) for scores in importance]
    return [scores.topk(keep, dim=-1).indices.sort(dim=-1).values for scores in importance]


@dataclass
class Entries:
    """One layer's stored entries per KV head, with how many context tokens each stands for."""

    keys: torch.Tensor  # [H, n, d]
    values: torch.Tensor  # [H, n, d]
    bias: torch.Tensor | None  # [H, n], the logit bias the model attended with
    counts: torch.Tensor  # [H, n] int64

    def take(self, indices: torch.Tensor) -> Entries:
        rows = indices[..., None].expand(-1, -1, self.keys.shape[-1])
        bias = self.bias.gather(1, indices) if self.bias is not None else None
        return Entries(self.keys.gather(1, rows), self.values.gather(1, rows), bias, self.counts.gather(1, indices))


def _decode_state(stream: ClusteringStream) -> ClusteringStream | None:
    """What the cache keeps for decoding: the stream where it goes on pruning (below budget 1), else nothing."""
    return stream if stream.prunes_while_decoding else None


def _stored_length(layer: CompressedLayer) -> int:
    return (layer.prefix.head_lengths()[0] if layer.prefix is not None else 0) + layer.tail_length


class ClusteringStream:
    """One sequence's pruning and merging: a `streaming_prefill` hook (`after_chunk`), then, while the answer
    is decoded, `after_tokens`.

    A fresh stream serves each context, so no count, centroid or random draw crosses sequences; each
    layer keeps its own counts. Tokens since the last prune stay in the raw tail, with their queries: the
    lookback may span chunks back to the last prune (before it, the model attended to entries that are
    gone). The last chunk always ends with the whole context in the prefixes, at most K entries per head.
    While the answer is decoded the stream is its cache's `method_state`, so `kv_bytes` counts what it holds:
    the counts (kept only once they differ from 1: after a merge, with the bias), the lookback queries and
    the query log (`log`) that the decode cache records into.
    """

    def __init__(self, config: AttentionClusteringConfig, plan: EntryPlan, context_length: int):
        self.config = config
        self.plan = plan
        self.context_length = context_length
        self.position = 0  # tokens seen so far: prunes fire when it passes a multiple of P
        self.scaling: float | None = None
        # A prune fires only once more than B entries are stored: with B ≥ N nothing happens before the end
        # of the context, so it is prefilled in one pass (the same result, and bit-exact full at budget 1).
        self.chunk_size = config.pruning_interval if plan.keep < context_length else context_length
        self.num_chunks = math.ceil(context_length / self.chunk_size)
        self.counts: dict[int, torch.Tensor] = {}
        self.recent_queries: list[torch.Tensor] | None = None
        self.merged = False
        self.generator = torch.Generator().manual_seed(config.seed)
        self.log: QueryLog | None = None

    def after_chunk(self, cache: KVBenchCache, index: int, queries: list[torch.Tensor], scaling: float) -> None:
        self.scaling = scaling
        self._remember(queries)
        final = index == self.num_chunks - 1
        limit = self.plan.clusters if final else self.plan.keep
        stored = _stored_length(cache.layers[0])
        if stored > limit or final:
            self._absorb(cache, compress=stored > limit)
        self.position = cache.get_seq_length()

    @property
    def prunes_while_decoding(self) -> bool:
        """Below budget 1: at budget 1 (B = K = N) the stream is the full cache, and must stay so."""
        return self.plan.clusters < self.context_length

    def after_tokens(self, cache: KVBenchCache, queries: list[torch.Tensor]) -> None:
        """After tokens fed past the context (question or generated; `queries` per layer, [H_q, m, d]): once
        the position t passes a multiple of P with more than B entries stored, prune to B and merge to K,
        as between two chunks of the prefill."""
        self._remember(queries)
        length = cache.get_seq_length()
        due = length // self.config.pruning_interval > self.position // self.config.pruning_interval
        self.position = length
        if due and _stored_length(cache.layers[0]) > self.plan.keep:
            self._absorb(cache, compress=True)

    def prunes_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        """Whether `new_tokens` more tokens could trigger a prune: they pass a multiple of P and could take the
        cache over B (an upper bound: the first multiple they pass may come before the cache is over B)."""
        length, interval = cache.get_seq_length(), self.config.pruning_interval
        passes = (length + new_tokens) // interval > length // interval
        return passes and _stored_length(cache.layers[0]) + new_tokens > self.plan.keep

    def _absorb(self, cache: KVBenchCache, compress: bool) -> None:
        """Move prefix and tail into a new prefix per layer, pruned and merged first when `compress`."""
        entries = [self._entries(i, layer) for i, layer in enumerate(cache.layers)]
        if compress:
            entries = self._compress(entries, self.recent_queries)
        weighted = self.merged and self.config.merge_bias
        for i, (layer, kept) in enumerate(zip(cache.layers, entries)):
            bias = None
            if weighted:  # otherwise every count is 1, and none is kept
                self.counts[i] = kept.counts.to(COUNT_DTYPE)
                bias = kept.counts.double().log().to(kept.keys.dtype)
            layer.absorb_tail(TokenPrefix(kept.keys, kept.values, bias))
        self.recent_queries = None

    def _remember(self, queries: list[torch.Tensor]) -> None:
        """Keep the last Δ queries of the tokens still in the tail, per layer."""
        lookback = self.config.lookback_window
        if self.recent_queries is not None:
            queries = [torch.cat([old, new], dim=1) for old, new in zip(self.recent_queries, queries)]
        # Copies where a view would hold on to more than Δ queries' storage.
        self.recent_queries = [q if q.shape[1] <= lookback else q[:, -lookback:].clone() for q in queries]

    def _entries(self, index: int, layer: CompressedLayer) -> Entries:
        """Prefix entries followed by the raw tail tokens (count 1, bias 0)."""
        tail_keys, tail_values = layer.keys[0], layer.values[0]
        ones = torch.ones(tail_keys.shape[:2], dtype=torch.int64, device=tail_keys.device)
        if layer.prefix is None:
            return Entries(tail_keys, tail_values, None, ones)
        prefix = layer.prefix.materialize()
        bias = None
        if prefix.bias is not None:
            bias = torch.cat([prefix.bias, torch.zeros_like(ones, dtype=prefix.bias.dtype)], dim=1)
        counts = self.counts.get(index)
        if counts is None:
            counts = torch.ones(prefix.keys.shape[:2], dtype=torch.int64, device=tail_keys.device)
        return Entries(
            torch.cat([prefix.keys, tail_keys], dim=1),
            torch.cat([prefix.values, tail_values], dim=1),
            bias,
            torch.cat([counts.long(), ones], dim=1),
        )

    def _compress(self, entries: list[Entries], queries: list[torch.Tensor]) -> list[Entries]:
        """Prune to B by importance (when over B), then merge into K centroids (when K is smaller)."""
        stored = entries[0].keys.shape[1]
        if stored > self.plan.keep:
            with torch.no_grad():  # only the ranking is used; training must not keep its graph
                importance = [attention_importance(q, e.keys, e.bias, self.scaling) for q, e in zip(queries, entries)]
            kept = select_kept(importance, self.plan.keep, self.config.scope)
            entries = [e.take(indices) for e, indices in zip(entries, kept)]
            stored = self.plan.keep
        if self.plan.clusters < stored:
            seeds = torch.randperm(stored, generator=self.generator)[: self.plan.clusters].sort().values
            entries = [self._merge(e, seeds.to(e.keys.device)) for e in entries]
            self.merged = True
        return entries

    def _merge(self, entries: Entries, seeds: torch.Tensor) -> Entries:
        counts = entries.counts if self.config.merge_bias else torch.ones_like(entries.counts)
        merged = merge(entries.keys, entries.values, counts, seeds, self.config.centroid_rule, self.config.kmeans_rate)
        merged_counts = merged.counts if self.config.merge_bias else torch.ones_like(merged.counts)
        return Entries(merged.keys, merged.values, None, merged_counts)


@register
class AttentionClustering(Method):
    name = "attention_clustering"
    version = 2  # K planned for bias and int32 counts
    family = "pruning + merging (own prefill, decode-time)"
    description = (
        "Prunes to the most-attended entries every P tokens (prefill and decode) and merges them into K centroids"
    )
    Config = AttentionClusteringConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(own_prefill=True)

    def prefills_itself(self, model_config, context_length: int, budget: float) -> bool:
        """Only when a prune fires before the end of the context (B < N): with B ≥ N the stream is one pass,
        the same forward as the shared prefill, and the merge at its end needs nothing but keys and values.
        The config does not say the cache dtype; the smallest one plans the fewest entries, so a cell it sends
        to the shared prefill never prunes before the end whatever the dtype."""
        budget = check_budget(budget)
        plan = plan_entries(self.config, context_length, budget, head_dim(model_config), SMALLEST_ELEMENT_SIZE)
        return plan.keep < context_length

    def _compress(self, observation: Observation, budget: float) -> Prefixes:
        n = observation.context_length
        plan = plan_entries(self.config, n, budget, observation.head_dim, observation.keys[0].element_size())
        if plan.keep < n:
            raise RuntimeError(
                f"{self.name} prunes while it prefills at budget {budget:g} on {n} tokens and cannot compress a "
                "finished prefill; call prefill_and_compress (run_cell does)"
            )
        # The one-pass stream's single chunk, replayed from the shared prefill's keys and values.
        cache = KVBenchCache(observation.num_layers)
        for layer, keys, values in zip(cache.layers, observation.keys, observation.values, strict=True):
            layer.update(keys[None], values[None])
        stream = ClusteringStream(self.config, plan, n)
        stream.after_chunk(cache, 0, [], observation.scaling)
        return Prefixes([layer.prefix for layer in cache.layers], decode_state=_decode_state(stream))

    def stream(self, model: torch.nn.Module, context_length: int, budget: float) -> ClusteringStream:
        """The chunk hook for one context of `context_length` tokens at `budget`."""
        if context_length < 1:
            raise ValueError("cannot prefill an empty context")
        element_size = next(model.parameters()).element_size()
        plan = plan_entries(self.config, context_length, check_budget(budget), head_dim(model.config), element_size)
        return ClusteringStream(self.config, plan, context_length)

    def prefill_and_compress(
        self, model: torch.nn.Module, input_ids: list[int], budget: float
    ) -> tuple[KVBenchCache, torch.Tensor]:
        stream = self.stream(model, len(input_ids), budget)
        cache, logits = streaming_prefill(model, input_ids, stream.chunk_size, stream.after_chunk)
        cache.method_state = _decode_state(stream)
        return cache, logits

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        stream = cache.method_state
        return stream is not None and stream.prunes_within(cache, new_tokens)

    def on_decode_start(self, cache: KVBenchCache) -> None:
        """Record the queries of every token after the context: a prune while decoding scores with them."""
        attach_query_log(cache, list(range(len(cache.layers))))

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Prune and merge when the position passes a multiple of P with more than B entries stored."""
        stream = logged_state(cache, self.name)
        if stream is None:
            return
        stream.after_tokens(cache, [stream.log.take(layer) for layer in range(len(cache.layers))])

    def train(self, model: torch.nn.Module, tokenizer, options: dict[str, Any], say: Callable[[str], None]) -> dict:
        """The seed's distillation fine-tuning (`methods/attention_clustering/distill.py`); `options` override
        `DistillationConfig`'s defaults."""
        from kvbench.methods.attention_clustering.distill import DistillationConfig, distill

        return distill(model, tokenizer, DistillationConfig(**options), self.config, say)

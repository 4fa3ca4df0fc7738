"""Shared pieces of token-eviction methods: budgets in tokens, window attention, group means, gathers.

Conventions (specs/reference_methods.md §0): scores are [H_kv, N] (higher = keep), query-head scores
are averaged over each KV head's query group, kept tokens are gathered in position order, and nothing
is ever expanded to query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvbench.harness.cache.prefix import TokenPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.harness.errors import BudgetError


def tokens_for_budget(context_length: int, budget: float) -> int:
    """Tokens kept per KV head: int(N·b), as kvpress counts them; a budget that keeps nothing is refused."""
    n_kept = int(context_length * budget)
    if n_kept < 1:
        raise BudgetError(f"budget {budget:g} keeps no token of a {context_length}-token context; raise the budget")
    return n_kept


def lowest_budget(tokens: int, context_length: int) -> float:
    """The smallest budget in steps of 0.001 whose ⌊b·N⌋ holds `tokens` tokens (1 where only the whole context
    does): the figure a refusal names, checked with the same floor the methods apply."""
    if tokens >= context_length:
        return 1.0
    steps = math.ceil(tokens / context_length * 1000)
    while math.floor(steps / 1000 * context_length) < tokens:
        steps += 1
    return steps / 1000


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[H_q, ...] → [H_kv, ...]: mean over the query heads that share a KV head."""
    return scores.reshape(num_kv_heads, scores.shape[0] // num_kv_heads, *scores.shape[1:]).mean(dim=1)


def window_attention(observation: Observation, layer: int, window: int) -> torch.Tensor:
    """Attention of the last `window` context queries over all context keys: [H_q, window, N], fp32.

    Causal inside the window: the query at position N − w + i sees keys up to that position.
    """
    if observation.window_queries is None or observation.window_queries[layer].shape[1] < window:
        raise ValueError(f"the prefill did not collect the last {window} queries; declare them in needs()")
    queries = observation.window_queries[layer][:, -window:].float()
    keys = observation.keys[layer].float()
    h_q, w, d = queries.shape
    h_kv, n = keys.shape[0], keys.shape[1]
    grouped = queries.reshape(h_kv, (h_q // h_kv) * w, d)
    logits = (grouped @ keys.transpose(-1, -2)) * observation.scaling
    logits = logits.reshape(h_q, w, n)
    positions = torch.arange(n - w, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > positions[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def snapkv_prefix_scores(observation: Observation, layer: int, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV scores of the tokens before the window: mean window attention, pooled, group-averaged: [H_kv, N − w].

    Computed once per (observation, layer, window, kernel, pooling): every budget of a sweep's cells asks again."""
    key = ("snapkv_prefix_scores", layer, window, kernel, pooling)
    return observation.memoized(key, lambda: _snapkv_prefix_scores(observation, layer, window, kernel, pooling))


def _snapkv_prefix_scores(observation: Observation, layer: int, window: int, kernel: int, pooling: str) -> torch.Tensor:
    n = observation.context_length
    attention = window_attention(observation, layer, window)[..., : n - window].mean(dim=1)
    if kernel > 1:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        attention = pool(attention[:, None], kernel_size=kernel, padding=kernel // 2, stride=1)[:, 0]
    return group_mean(attention, observation.num_kv_heads)


def gather_heads(observation: Observation, layer: int, indices: torch.Tensor | list[torch.Tensor]) -> TokenPrefix:
    """Keep the given token indices per KV head ([H_kv, n] or a ragged list), in position order."""
    keys, values = observation.keys[layer], observation.values[layer]
    if isinstance(indices, torch.Tensor):
        order = indices.sort(dim=-1).values
        gather_idx = order[..., None].expand(-1, -1, keys.shape[-1])
        return TokenPrefix(keys.gather(1, gather_idx), values.gather(1, gather_idx))
    ordered = [idx.sort().values for idx in indices]
    return TokenPrefix(
        [keys[h].index_select(0, idx) for h, idx in enumerate(ordered)],
        [values[h].index_select(0, idx) for h, idx in enumerate(ordered)],
    )


def keep_top(observation: Observation, layer: int, scores: torch.Tensor, n_kept: int) -> TokenPrefix:
    """Keep each KV head's `n_kept` highest-scoring tokens."""
    return gather_heads(observation, layer, scores.topk(n_kept, dim=-1).indices)


def keep_window_and_top(
    observation: Observation, layer: int, prefix_scores: torch.Tensor | None, n_kept: int, window: int
) -> TokenPrefix:
    """Keep the whole observation window plus the top (n_kept − window) earlier tokens per head.

    A budget smaller than the window keeps the most recent n_kept tokens: the window is protected, and
    within it recency decides.
    """
    n = observation.context_length
    h_kv = observation.num_kv_heads
    device = observation.keys[layer].device
    recent = torch.arange(max(n - min(window, n_kept), 0), n, device=device).expand(h_kv, -1)
    if n_kept <= window or prefix_scores is None:
        return gather_heads(observation, layer, recent)
    top = prefix_scores.topk(n_kept - window, dim=-1).indices
    return gather_heads(observation, layer, torch.cat([top, recent], dim=-1))


def protected(scores: torch.Tensor) -> torch.Tensor:
    """Where a scorer protected a token (window, sinks, last token): it scores +inf, so it always survives."""
    return torch.isposinf(scores)


def top_indices(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """[H, n_kept] indices of each head's highest scores; protected tokens first.

    Where a head's protected tokens alone fill the budget, the most recent of them stay (recency decides within
    a window, as `keep_window_and_top` does), so +inf ties never leave the choice to `topk`.
    """
    guarded = protected(scores)
    full = guarded.sum(dim=-1) >= n_kept
    if bool(full.any()):
        positions = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype).expand_as(scores)
        by_recency = torch.where(guarded, positions, float("-inf"))
        scores = torch.where(full[:, None], by_recency, scores)
    return scores.topk(n_kept, dim=-1).indices


def keep_scored(observation: Observation, layer: int, scores: torch.Tensor, n_kept: int) -> TokenPrefix:
    """Keep each KV head's `n_kept` highest-scoring tokens of a scorer's [H_kv, N] scores (see `top_indices`)."""
    return gather_heads(observation, layer, top_indices(scores, n_kept))


def adaptive_head_indices(scores: torch.Tensor, n_kept: int, alpha: float) -> list[torch.Tensor]:
    """Global top-(H·n_kept) over a layer's heads after each head secures its top int(n_kept·α) (AdaKV,
    arXiv 2407.11550): ragged per-head counts summing to H·n_kept."""
    h_kv, n = scores.shape
    scores = scores.clone()
    n_safe = int(n_kept * alpha)
    if n_safe > 0:
        safe = scores.topk(n_safe, dim=-1).indices
        scores.scatter_(1, safe, float("inf"))
    chosen = scores.flatten().topk(h_kv * n_kept).indices
    heads, positions = chosen // n, chosen % n
    return [positions[heads == h] for h in range(h_kv)]


def adaptive_indices(scores: torch.Tensor, n_kept: int, alpha: float) -> torch.Tensor | list[torch.Tensor]:
    """AdaKV's selection over a scorer's [H_kv, N] scores; where the protected tokens alone fill the budget, every
    head keeps the same most recent protected tokens (there is nothing left to allocate)."""
    if int(protected(scores).sum(dim=-1).max()) >= n_kept:
        return top_indices(scores, n_kept)
    return adaptive_head_indices(scores, n_kept, alpha)


def decode_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention [H_kv, g, m, n] of the m newest tokens' queries [H_q, m, d] over a layer's stored keys
    [H_kv, n, d] (uniform heads), fp32, per KV head's query group (never expanded).

    The queries' own tokens are the last m stored keys (stored keys are in position order): only among those
    does causality mask.
    """
    h_q, m, dim = queries.shape
    h_kv, n = keys.shape[0], keys.shape[1]
    grouped = queries.float().reshape(h_kv, h_q // h_kv, m, dim)
    logits = torch.einsum("hgid,hjd->hgij", grouped, keys.float()) * scaling
    future = torch.arange(n, device=keys.device)[None, :] > torch.arange(n - m, n, device=keys.device)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)

"""Shared pieces of token-eviction methods: budgets in tokens, window attention, group means, gathers.

Conventions (specs/reference_methods.md §0): scores are [H_kv, N] (higher = keep), query-head scores
are averaged over each KV head's query group, kept tokens are gathered in position order, and nothing
is ever expanded to query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvbench.harness.errors import BudgetError
from kvbench.harness.prefill import Observation
from kvbench.harness.prefix import TokenPrefix


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
    """SnapKV scores of the tokens before the window: mean window attention, pooled, group-averaged: [H_kv, N − w]."""
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

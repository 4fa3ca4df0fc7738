"""DynamicKV: per-layer token budgets reallocated progressively while prefilling (Zhou et al., arXiv 2412.14838).

Attention in the prefill is always full and the compressed caches are written after the last layer, so the
layer-by-layer algorithm runs on the shared observation and gives what the online version would keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.harness.cache.prefix import LayerPrefix, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import BudgetError
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import gather_heads, group_mean, lowest_budget, window_attention


@dataclass(frozen=True)
class DynamicKVConfig:
    """arXiv 2412.14838 with the official scripts' defaults (specs/baselines.md §2): window w = 8, pooling
    kernel 7, r_max = 10 (`radio_max`), reallocation every m = 4 layers.

    Average pooling is the official setting for Llama-3 (SmolLM2 is a Llama); Mistral and Qwen2 used max.
    Budgets are per KV head (the spec's GQA mode): C = ⌊b·N⌋ is the mean per-layer budget including the
    window (rounded down, so the kept tokens never exceed b of the full cache), and scores are averaged over
    each KV head's query group before pooling. The spec's official mode (budgets per expanded query head) is
    not offered. A budget with C ≤ w is refused rather than clamped to C = w + 1, which would exceed it. The algorithm runs on the shared prefill's
    observation, so the temporary r_max·(C − w) caches never exist and add nothing to the measured peak.
    """

    window: int = option(8, at_least=1)
    kernel: int = option(7, at_least=1, odd=True)  # centred pooling: an even kernel would shift the scores by one
    pooling: str = option("avg", choices=("avg", "max"))
    r_max: float = option(10.0, at_least=1)  # a layer's temporary cache, in units of the mean budget
    period: int = option(4, at_least=1)


def dynamickv_scores(observation: Observation, layer: int, config: DynamicKVConfig) -> torch.Tensor:
    """Σ over the window of softmax(q_i Kᵀ/√d)_j, group-averaged then pooled: [H_kv, N − w] for tokens before the window."""
    n = observation.context_length
    attention = window_attention(observation, layer, config.window)[..., : n - config.window].sum(dim=1)
    grouped = group_mean(attention, observation.num_kv_heads)
    pool = F.avg_pool1d if config.pooling == "avg" else F.max_pool1d
    return pool(grouped[:, None], kernel_size=config.kernel, padding=config.kernel // 2, stride=1)[:, 0]


def reallocate(scores: list[torch.Tensor], per_layer: int, num_layers: int) -> list[int]:
    """New budgets n_j for the layers seen so far: their share of the global top (per_layer·H·(l+1)) scores.

    n_j = ⌊p_j·per_layer·L⌋ with the model's full L (not l+1), the rounding remainder going to the last
    layer seen; at the last layer the budgets therefore sum to per_layer·L exactly.
    """
    stacked = torch.stack(scores)
    layers_seen, heads, prefix_length = stacked.shape
    ranked = torch.sort(stacked.flatten(), descending=True, stable=True).indices
    chosen = ranked[: per_layer * heads * layers_seen]
    counts = torch.bincount(chosen // (heads * prefix_length), minlength=layers_seen).tolist()
    total = per_layer * num_layers
    budgets = [count * total // sum(counts) for count in counts]
    budgets[-1] += total - sum(budgets)
    return budgets


def progressive_orders(
    scores: list[torch.Tensor], per_layer: int, r_max: float, period: int
) -> Iterator[list[torch.Tensor]]:
    """The kept prefix tokens of every layer seen so far ([H, n_l] by score, best first), after each layer.

    Layer l first keeps its top min(r_max·per_layer, N − w) tokens per head; every `period` layers, and at
    the last layer whatever L is, all layers seen are cut to their reallocated budgets. Cuts keep the best
    tokens of the current cache, so caches only shrink and budget lost to a cap is not redistributed.
    """
    num_layers = len(scores)
    temporary = min(int(r_max * per_layer), scores[0].shape[-1])
    orders: list[torch.Tensor] = []
    for layer, layer_scores in enumerate(scores):
        orders.append(torch.sort(layer_scores, dim=-1, descending=True, stable=True).indices[:, :temporary])
        if layer % period == period - 1 or layer == num_layers - 1:
            budgets = reallocate(scores[: layer + 1], per_layer, num_layers)
            orders = [order[:, : min(budget, order.shape[1])] for order, budget in zip(orders, budgets)]
        yield list(orders)


@register
class DynamicKV(Method):
    name = "dynamickv"
    version = 2  # budgets round down (a ceiling)
    family = "token eviction (per-layer budgets)"
    description = "SnapKV-style scores with per-layer budgets reallocated every 4 layers by global top-k"
    Config = DynamicKVConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=self.config.window)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n, window = observation.context_length, self.config.window
        per_layer_with_window = math.floor(budget * n)
        if per_layer_with_window >= n:
            return [TokenPrefix(k, v, first_position=0) for k, v in zip(observation.keys, observation.values)]
        if per_layer_with_window <= window:
            raise BudgetError(
                f"dynamickv budget {budget:g} keeps {per_layer_with_window} tokens per head of {n}, not more than "
                f"its {window}-token window; the lowest reachable budget is {lowest_budget(window + 1, n):g}"
            )
        layers = observation.compressed_layers()  # every layer, but for sliding windows that keep theirs
        scores = [dynamickv_scores(observation, layer, self.config) for layer in layers]
        per_layer = per_layer_with_window - window
        # Only the caches after the last layer are written; the earlier states are the online algorithm's.
        *_, orders = progressive_orders(scores, per_layer, self.config.r_max, self.config.period)
        device = observation.keys[0].device
        recent = torch.arange(n - window, n, device=device).expand(observation.num_kv_heads, -1)
        prefixes: list[LayerPrefix | None] = [None] * observation.num_layers
        for layer, order in zip(layers, orders, strict=True):
            prefixes[layer] = gather_heads(observation, layer, torch.cat([order, recent], dim=-1))
        return prefixes

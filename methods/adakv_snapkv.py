"""AdaKV over SnapKV: head-adaptive budgets inside each layer, stored ragged (Feng et al., arXiv 2407.11550)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.harness.prefill import Observation, ObservationNeeds
from kvbench.harness.prefix import LayerPrefix
from kvbench.methods._eviction import gather_heads, keep_window_and_top, snapkv_prefix_scores, tokens_for_budget
from kvbench.methods.base import Method, register


@dataclass(frozen=True)
class AdaKVSnapKVConfig:
    """arXiv 2407.11550 (AdaKV) wrapping SnapKV (arXiv 2404.14469), kvpress defaults.

    Each head first secures its top `alpha_safeguard`·n_kept tokens, then the layer's H_kv·n_kept slots
    go to the globally highest SnapKV scores across heads. Window tokens are protected (score +inf).
    Unlike kvpress, which masks evicted keys and saves no memory, heads are stored ragged.
    """

    window: int = 64
    kernel: int = 5
    pooling: str = "avg"
    alpha_safeguard: float = 0.20


def adaptive_head_indices(scores: torch.Tensor, n_kept: int, alpha: float) -> list[torch.Tensor]:
    """Global top-(H·n_kept) over a layer's heads after each head secures its top int(n_kept·α)."""
    h_kv, n = scores.shape
    scores = scores.clone()
    n_safe = int(n_kept * alpha)
    if n_safe > 0:
        safe = scores.topk(n_safe, dim=-1).indices
        scores.scatter_(1, safe, float("inf"))
    chosen = scores.flatten().topk(h_kv * n_kept).indices
    heads, positions = chosen // n, chosen % n
    return [positions[heads == h] for h in range(h_kv)]


@register
class AdaKVSnapKV(Method):
    name = "adakv_snapkv"
    family = "token eviction (per-head budgets)"
    description = "SnapKV scores with AdaKV's global top-k across a layer's heads (ragged heads)"
    Config = AdaKVSnapKVConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=self.config.window)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n = observation.context_length
        n_kept = tokens_for_budget(n, budget)
        window = min(self.config.window, n)
        if n_kept <= window:
            # The protected window alone fills the budget: every head keeps the same most recent tokens.
            return [
                keep_window_and_top(observation, layer, None, n_kept, window) for layer in range(observation.num_layers)
            ]
        prefixes = []
        for layer in range(observation.num_layers):
            scores = torch.full((observation.num_kv_heads, n), float("inf"), device=observation.keys[layer].device)
            if window < n:
                scores[:, : n - window] = snapkv_prefix_scores(
                    observation, layer, window, self.config.kernel, self.config.pooling
                )
            indices = adaptive_head_indices(scores, n_kept, self.config.alpha_safeguard)
            prefixes.append(gather_heads(observation, layer, indices))
        return prefixes

"""Knorm: keep the keys with the lowest L2 norm (Devoto et al., arXiv 2406.11430)."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import keep_top, tokens_for_budget


@dataclass(frozen=True)
class KnormConfig:
    """arXiv 2406.11430: score = −‖k‖₂ per KV head; no attention needed. All layers are compressed (kvpress)."""


@register
class Knorm(Method):
    name = "knorm"
    family = "token eviction"
    description = "Keeps the int(b*N) keys with the smallest L2 norm per KV head"
    Config = KnormConfig

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n_kept = tokens_for_budget(observation.context_length, budget)
        return [
            keep_top(observation, layer, -observation.keys[layer].float().norm(dim=-1), n_kept)
            for layer in range(observation.num_layers)
        ]

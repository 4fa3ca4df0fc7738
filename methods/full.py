"""The uncompressed cache: the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.harness.cache.prefix import LayerPrefix, TokenPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.methods.base import Method, register


@dataclass(frozen=True)
class FullConfig:
    """No options: the full cache keeps every context token of every head."""


@register
class Full(Method):
    name = "full"
    family = "none"
    description = "Uncompressed KV cache (the baseline); ignores the budget"
    Config = FullConfig
    uses_budget = False

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        return [TokenPrefix(k, v, first_position=0) for k, v in zip(observation.keys, observation.values)]

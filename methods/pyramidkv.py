"""PyramidKV: SnapKV selection with budgets that shrink from lower to higher layers (Cai et al., arXiv 2406.02069)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.snapkv import SnapKVConfig, snapkv_layer


@dataclass(frozen=True)
class PyramidKVConfig:
    """arXiv 2406.02069 with kvpress's budget rule: window 64, kernel 5 (average pooling), β = 20.

    β ≥ 1: the top layer keeps 1/β of what the bottom one does (β = 1 is uniform); below 1 the pyramid would
    be upside down, and the budget rule falls back to uniform budgets.
    """

    window: int = option(64, at_least=1)
    kernel: int = option(5, at_least=1, odd=True)
    pooling: str = option("avg", choices=("avg", "max"))
    beta: float = option(20.0, at_least=1)


def pyramid_budgets(context_length: int, budget: float, num_layers: int, window: int, beta: float) -> list[int]:
    """Tokens kept per layer, decreasing linearly; their mean is b·N up to rounding (reference_methods.md §6)."""
    n = context_length
    capacity = window + n * budget
    min_num = (capacity - window) / beta
    max_num = 2 * (capacity - window) - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = 2 * (capacity - window) - max_num
    if not (n >= max_num >= min_num >= window) or num_layers == 1:
        return [math.floor(n * budget)] * num_layers  # a ceiling: b·N rounded down
    step = (max_num - min_num) / (num_layers - 1)
    return [round(max_num - layer * step) for layer in range(num_layers)]


@register
class PyramidKV(Method):
    name = "pyramidkv"
    version = 2  # uniform budgets (one layer, or a pyramid that cannot be built) round down, as budgets must
    family = "token eviction"
    description = "SnapKV scores with linearly decreasing per-layer budgets (pyramid)"
    Config = PyramidKVConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=self.config.window)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        snap = SnapKVConfig(self.config.window, self.config.kernel, self.config.pooling)
        layers = observation.compressed_layers()  # every layer, but for sliding windows that keep theirs
        budgets = pyramid_budgets(observation.context_length, budget, len(layers), self.config.window, self.config.beta)
        prefixes: list[LayerPrefix | None] = [None] * observation.num_layers
        for layer, n in zip(layers, budgets, strict=True):
            prefixes[layer] = snapkv_layer(observation, layer, snap, max(n, 1))
        return prefixes

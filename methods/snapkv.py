"""SnapKV: keep what the context's last window attends to (Li et al., arXiv 2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import keep_window_and_top, snapkv_prefix_scores, tokens_for_budget


@dataclass(frozen=True)
class SnapKVConfig:
    """arXiv 2404.14469, with kvpress's defaults: observation window 64, pooling kernel 5 (average).

    Query-agnostic: the window is the end of the context, never the question (which comes after
    compression). Scores are averaged over each KV head's query group, per reference_methods.md §2.
    """

    window: int = option(64, at_least=1)
    kernel: int = option(5, at_least=1, odd=True)  # centred pooling: an even kernel would shift the scores by one
    pooling: str = option("avg", choices=("avg", "max"))


def snapkv_layer(observation: Observation, layer: int, config: SnapKVConfig, n_kept: int) -> LayerPrefix:
    """One layer of SnapKV at `n_kept` tokens per head (the window included); PyramidKV reuses it."""
    window = min(config.window, observation.context_length)
    if n_kept <= window:
        return keep_window_and_top(observation, layer, None, n_kept, window)
    scores = snapkv_prefix_scores(observation, layer, window, config.kernel, config.pooling)
    return keep_window_and_top(observation, layer, scores, n_kept, window)


@register
class SnapKV(Method):
    name = "snapkv"
    family = "token eviction"
    description = "Keeps the window plus the tokens its queries attend to most (pooled, per KV head)"
    Config = SnapKVConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=self.config.window)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n_kept = tokens_for_budget(observation.context_length, budget)
        return [snapkv_layer(observation, layer, self.config, n_kept) for layer in range(observation.num_layers)]

"""AdaKV over SnapKV: head-adaptive budgets inside each layer, stored ragged (Feng et al., arXiv 2407.11550).

The name of `adakv:base=snapkv` with SnapKV's options at the top level, kept so that its rows and commands stay
what they were; the selection is the generic one in `kvbench.methods.adakv`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.method_spec import option
from kvbench.methods.adakv import adakv_layers
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import adaptive_head_indices
from kvbench.methods.common.scorers import SCORERS, Scorer
from kvbench.methods.snapkv import SnapKVConfig

__all__ = ["AdaKVSnapKV", "AdaKVSnapKVConfig", "adaptive_head_indices"]


@dataclass(frozen=True)
class AdaKVSnapKVConfig:
    """arXiv 2407.11550 (AdaKV) wrapping SnapKV (arXiv 2404.14469), kvpress defaults.

    Each head first secures its top `alpha_safeguard`·n_kept tokens, then the layer's H_kv·n_kept slots
    go to the globally highest SnapKV scores across heads. Window tokens are protected (score +inf).
    Unlike kvpress, which masks evicted keys and saves no memory, heads are stored ragged.
    """

    window: int = option(64, at_least=1)
    kernel: int = option(5, at_least=1, odd=True)
    pooling: str = option("avg", choices=("avg", "max"))
    alpha_safeguard: float = option(0.20, at_least=0, at_most=1)


@register
class AdaKVSnapKV(Method):
    name = "adakv_snapkv"
    family = "token eviction (per-head budgets)"
    description = "SnapKV scores with AdaKV's global top-k across a layer's heads (ragged heads)"
    Config = AdaKVSnapKVConfig

    @property
    def scorer(self) -> Scorer:
        method, score = SCORERS["snapkv"]
        return Scorer(
            "snapkv", SnapKVConfig(self.config.window, self.config.kernel, self.config.pooling), method, score
        )

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=self.config.window)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        return adakv_layers(observation, self.scorer, budget, self.config.alpha_safeguard)

"""AdaKV: head-adaptive budgets inside each layer over any scorer, stored ragged (Feng et al., arXiv 2407.11550)."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import adaptive_indices, gather_heads, tokens_for_budget
from kvbench.methods.common.scorers import Scorer, canonical_options, get_scorer


@dataclass(frozen=True)
class AdaKVConfig:
    """arXiv 2407.11550 with kvpress's defaults (AdaKVPress): α_safeguard = 0.20.

    Each head first secures its top int(α·n_kept) tokens by the base's scores, then the layer's H_kv·n_kept
    slots (n_kept = int(b·N)) go to the globally highest scores across its heads; tokens the base protects
    (window, sinks, last token) always stay. kvpress masks the evicted keys and saves no memory; here heads are
    stored ragged.

    base: the scorer (snapkv, h2o, tova, expected_attention, knorm), with its own defaults unless
    `base_options` sets some, as `option=value/option=value` (e.g. `base_options=epsilon=0.01` for kvpress's
    "expected_attention" preset); they are kept in one canonical spelling (only those that differ from the
    defaults). Cross-head comparison means something only for scores on a common scale (attention
    probabilities: snapkv, h2o, expected_attention); knorm's key norms rank heads by norm, and tova's one row
    per layer makes every head keep the same tokens, as tova alone does.
    """

    base: str = option("snapkv", choices=("snapkv", "h2o", "tova", "expected_attention", "knorm"))  # SCORERS
    alpha_safeguard: float = option(0.20, at_least=0, at_most=1)
    base_options: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_options", canonical_options(self.base, self.base_options))


def adakv_layers(observation: Observation, scorer: Scorer, budget: float, alpha: float) -> list[LayerPrefix]:
    """Every layer's AdaKV selection over `scorer`: ragged heads summing to H_kv·int(b·N) tokens per layer."""
    n_kept = tokens_for_budget(observation.context_length, budget)
    return [
        gather_heads(observation, layer, adaptive_indices(scorer.scores(observation, layer, n_kept), n_kept, alpha))
        for layer in range(observation.num_layers)
    ]


@register
class AdaKV(Method):
    name = "adakv"
    family = "token eviction (per-head budgets)"
    description = "Any scorer's tokens with AdaKV's global top-k across a layer's heads (ragged heads)"
    Config = AdaKVConfig

    @property
    def scorer(self) -> Scorer:
        return get_scorer(self.config.base, self.config.base_options)

    def needs(self) -> ObservationNeeds:
        return self.scorer.needs()

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        return adakv_layers(observation, self.scorer, budget, self.config.alpha_safeguard)

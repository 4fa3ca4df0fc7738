"""StreamingLLM: attention sinks plus a recent window (Xiao et al., arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.harness.errors import BudgetError
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import gather_heads, tokens_for_budget


@dataclass(frozen=True)
class StreamingLLMConfig:
    """arXiv 2309.17453: keep the first `n_sink` tokens (attention sinks) and the most recent ones.

    n_sink = 4 as in the paper and kvpress. Compression happens once after the prefill with the original
    positions kept (kvpress parity), so the budget is the fraction of context tokens kept.
    """

    n_sink: int = option(4, at_least=0)


@register
class StreamingLLM(Method):
    name = "streaming_llm"
    family = "token eviction"
    description = "Keeps n_sink first tokens and the most recent ones (attention sinks)"
    Config = StreamingLLMConfig

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n = observation.context_length
        n_kept = tokens_for_budget(n, budget)
        n_sink = self.config.n_sink
        if n_kept <= n_sink and n_kept < n:
            raise BudgetError(
                f"streaming_llm at budget {budget:g} keeps {n_kept} tokens of {n}, not more than its "
                f"{n_sink} sink tokens; raise the budget"
            )
        device = observation.keys[0].device
        kept = torch.cat([torch.arange(min(n_sink, n_kept)), torch.arange(n - (n_kept - min(n_sink, n_kept)), n)])
        indices = kept.to(device).expand(observation.num_kv_heads, -1)
        return [gather_heads(observation, layer, indices) for layer in range(observation.num_layers)]

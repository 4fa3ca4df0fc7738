"""Random eviction: the quality floor any scorer must beat (specs/reference_methods.md §10)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import keep_top, tokens_for_budget


@dataclass(frozen=True)
class RandomConfig:
    """Uniform scores per (KV head, token); kvpress RandomPress. seed: an extra offset, hashed with the sample's
    seed (`Observation.seed`) and the layer."""

    seed: int = option(0, at_least=0)


def _layer_seed(seed: int, observation: Observation, layer: int) -> int:
    """Seed from the sample's seed (the harness derives it from the run seed and the sample), the config's
    seed (an extra offset) and the layer: the same run draws the same tokens, another run seed other ones."""
    digest = hashlib.sha256(f"{observation.seed}:{seed}:{layer}".encode())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


@register
class RandomEviction(Method):
    name = "random"
    version = 2  # seeded by the run seed, the sample and the layer
    family = "token eviction"
    description = "Keeps a uniformly random int(b*N) tokens per KV head (a floor)"
    Config = RandomConfig

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n_kept = tokens_for_budget(observation.context_length, budget)
        shape = (observation.num_kv_heads, observation.context_length)
        prefixes = []
        for layer in range(observation.num_layers):
            generator = torch.Generator().manual_seed(_layer_seed(self.config.seed, observation, layer))
            scores = torch.rand(shape, generator=generator).to(observation.keys[layer].device)
            prefixes.append(keep_top(observation, layer, scores, n_kept))
        return prefixes

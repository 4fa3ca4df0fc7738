"""Per-head token scores of one layer, for every score-based eviction method: the table that wrappers draw from.

A scorer turns an observation into [H_kv, N] scores for one layer (higher = keep; tokens its method protects,
such as a window, sinks or the last token, score +inf), exactly as its own method ranks them. Wrappers that
decide only how many tokens each head keeps (AdaKV's global top-k, a learned per-head allocation) need
nothing else: `get_scorer(name, options).scores(observation, layer, n_kept)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import KVBenchError, UnknownNameError
from kvbench.harness.method_spec import MethodSpec, OptionError, check_values, configured_options, method_label
from kvbench.methods.base import Method
from kvbench.methods.common.eviction import snapkv_prefix_scores
from kvbench.methods.expected_attention import ExpectedAttention, expected_attention_scores
from kvbench.methods.h2o import H2O, h2o_scores
from kvbench.methods.knorm import Knorm
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.tova import TOVA, tova_scores

# (observation, layer, the method's config, n_kept) -> [H_kv, N]. n_kept is the mean tokens kept per head: only
# budget-dependent protections read it (h2o's recent share).
ScoreFunction = Callable[[Observation, int, Any, int], torch.Tensor]


def snapkv_scores(observation: Observation, layer: int, config: Any, n_kept: int) -> torch.Tensor:
    """SnapKV's pooled window attention for the tokens before the window; the window itself is protected."""
    n = observation.context_length
    window = min(config.window, n)
    scores = torch.full((observation.num_kv_heads, n), float("inf"), device=observation.keys[layer].device)
    if window < n:
        scores[:, : n - window] = snapkv_prefix_scores(observation, layer, window, config.kernel, config.pooling)
    return scores


def knorm_scores(observation: Observation, layer: int, config: Any, n_kept: int) -> torch.Tensor:
    """−‖k‖₂ per KV head. Not an attention probability: compared across heads (AdaKV) it ranks heads by key
    norm, not by how much attention they would lose."""
    return -observation.keys[layer].float().norm(dim=-1)


SCORERS: dict[str, tuple[type[Method], ScoreFunction]] = {
    "snapkv": (SnapKV, snapkv_scores),
    "h2o": (H2O, h2o_scores),
    "tova": (TOVA, tova_scores),
    "expected_attention": (ExpectedAttention, expected_attention_scores),
    "knorm": (Knorm, knorm_scores),
}

# Options of a method that act while decoding, not on its scores: they mean nothing for a base scorer.
_DECODE_OPTIONS = ("decode_evict",)


@dataclass(frozen=True)
class Scorer:
    """A base scorer with its options: what the prefill must collect for it, and its scores of one layer."""

    name: str
    config: Any
    method: type[Method]
    score: ScoreFunction

    def needs(self) -> ObservationNeeds:
        return self.method(self.config).needs()

    def scores(self, observation: Observation, layer: int, n_kept: int) -> torch.Tensor:
        """[H_kv, N], higher = keep, protected tokens +inf."""
        return self.score(observation, layer, self.config, n_kept)


def _entry(name: str) -> tuple[type[Method], ScoreFunction]:
    if name not in SCORERS:
        raise UnknownNameError(f"unknown base scorer {name!r}; valid scorers: {', '.join(SCORERS)}")
    return SCORERS[name]


def scorer_config(name: str, options: str = "") -> Any:
    """The base method's config from `option=value/option=value` (typed and checked as its own options are; `/`
    because a sweep's method list is comma-separated); one line naming the base and the option for a bad one
    (`OptionError`, so that the method it is the base of puts its own name in front)."""
    method, _ = _entry(name)
    pairs = []
    for part in filter(None, (p.strip() for p in options.split("/"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise OptionError(f"base option {part!r} is not option=value (e.g. base_options=window=32/kernel=7)")
        pairs.append((key.strip(), value.strip()))
    try:
        typed = configured_options(name, method.Config, MethodSpec(name, tuple(pairs)))
    except OptionError as error:
        raise OptionError(f"base {error}") from None
    try:
        check_values(method.Config, typed)
    except OptionError as error:
        raise OptionError(f"base {name}: {error}") from None
    if any(typed.get(option) for option in _DECODE_OPTIONS):
        raise KVBenchError(f"{name}'s {', '.join(_DECODE_OPTIONS)} acts while decoding; a base scorer only scores")
    try:
        return dataclasses.replace(method.Config(), **typed)
    except OptionError as error:
        raise OptionError(f"base {name}: {error}") from None
    except (TypeError, ValueError) as error:
        raise KVBenchError(f"base scorer {name}: {error}") from None


def canonical_options(name: str, options: str = "") -> str:
    """The options that differ from the base's defaults, in field order: one spelling per configuration."""
    return "/".join(method_label(name, scorer_config(name, options)).split(":")[1:])


def get_scorer(name: str, options: str = "") -> Scorer:
    method, score = _entry(name)
    return Scorer(name, scorer_config(name, options), method, score)

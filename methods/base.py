"""The Method API on one screen.

Every method writes two things, plus its `name`, `family` and `description`:

    Config                 a frozen dataclass: the options (`NAME:option=value`), the paper's defaults, its arXiv id;
                           each numeric option declares the values it admits (`option(64, at_least=1)`)
    _compress(obs, b)      the prefill's observation -> one LayerPrefix per layer, at most b of the context's bytes

Everything else is optional, grouped by what it is for. Each group is a mixin that `Method` already inherits,
with defaults that do nothing, so a method overrides only what it uses:

    reading the prefill    needs() -> ObservationNeeds: the last w queries, attention column sums, hidden states
    Calibration            per-model artifacts and training: needs_calibration, learns, calibrate,
                           load_calibration, calibration_key, method_bytes, train (fine-tunes the model)
    DecodeTime             acting while the answer is generated: on_decode_start, on_decode_step,
                           changes_cache_within, leaves_windows
    OwnPrefill             compressing while prefilling: prefills_itself, prefill_and_compress

and two class flags: `uses_budget = False` for methods that keep everything (run once, at b = 1), and
`version`, raised whenever a change alters what the method keeps for the same config (it is in every row's
identity). A method maps the budget b (fraction of the context's full-cache bytes it may keep) to its own
knobs; the harness measures the bytes it actually kept, never the method.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine import windows
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import KVBenchError, UnknownNameError, check_budget
from kvbench.harness.method_spec import (
    OptionError,
    check_values,
    configured_options,
    method_config,
    method_label,
    parse_method_spec,
)


class Calibration:
    """Per-model artifacts computed once, offline (bases, head scores, trained weights), and training."""

    # True for methods that need per-model artifacts (bases, head scores, groups) computed once, offline.
    needs_calibration: ClassVar[bool] = False
    # True for learned methods: their calibration trains weights (`kvbench train NAME --out FILE` makes a checkpoint
    # with the config's fields as options; `NAME:checkpoint=PATH` uses one).
    learns: ClassVar[bool] = False

    def calibrate(self, model: torch.nn.Module, tokenizer) -> dict[str, torch.Tensor]:
        """Compute this method's per-model artifacts from offline data (see `calibration_ids`); the harness
        caches them per model and config and hands them back through `load_calibration`. A learned method
        trains here and returns a `kvbench.harness.artifacts.training.Trained` (weights, data record, losses),
        which the harness writes as a versioned checkpoint."""
        raise NotImplementedError(f"{self.name} needs no calibration")

    def load_calibration(self, artifacts: dict[str, torch.Tensor]) -> None:
        """Take artifacts made by `calibrate` (fresh or from the cache) before the first compress."""
        raise NotImplementedError(f"{self.name} needs no calibration")

    def calibration_key(self) -> str:
        """What the artifacts depend on besides the model: by default the whole config."""
        return repr(self.config)

    def method_bytes(self) -> int | None:
        """Bytes of the model-sized artifacts the method holds that do not grow with the context (a decoder, a
        scorer's weights): reported in their own column, never in kv_bytes. None for methods that hold none."""
        return None

    def train(self, model: torch.nn.Module, tokenizer, options: dict[str, Any], say: Callable[[str], None]) -> dict:
        """Fine-tune `model` in place to work with this method's compression (`kvbench train`); returns a
        JSON-able record of the data, settings and losses. Only methods whose paper trains the model have one."""
        raise NotImplementedError(f"{self.name} has no training step")

    @property
    def has_training_step(self) -> bool:
        return type(self).train is not Calibration.train


class DecodeTime:
    """Acting while the answer is generated: the cache changes after the context (per-step eviction, merging)."""

    # True for a decode-time method that leaves a model's sliding-window layers as they are (kivi quantizes only its
    # own layers): such a method runs on models whose windows are shorter than the context; the others are refused
    # there, since rewriting a window layer would lose its positions.
    leaves_windows: ClassVar[bool] = False

    def on_decode_start(self, cache: KVBenchCache) -> None:
        """Once per answer, before anything after the context (question or first token) is fed: decode-time
        methods attach their per-sequence state to the cache here (e.g. a query recorder)."""

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Per generated token; decode-time methods evict here. Most methods compress once and do nothing."""

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        """Whether feeding `new_tokens` more tokens after `cache` (just compressed by this method) could make its
        decode hooks change the cache. If not, they can be fed in one pass. By default: whether the method
        acts while decoding at all; a method that acts only at some points says when it would."""
        return self.acts_while_decoding

    @property
    def acts_while_decoding(self) -> bool:
        """Whether the cache changes token by token after the context (the method overrides `on_decode_step`):
        such a method's cache must see every token one at a time, also when given tokens are scored."""
        return type(self).on_decode_step is not DecodeTime.on_decode_step


class OwnPrefill:
    """Compressing while prefilling (online pruning, projections that later layers attend to): the method runs
    its own prefill instead of sharing the sweep's."""

    def prefills_itself(self, model_config, context_length: int, budget: float) -> bool:
        """Whether this cell needs the method's own prefill (`prefill_and_compress`) rather than the shared one:
        by default what needs() declares; a method whose prefill changes only at some budgets says which."""
        return self.needs().own_prefill

    def prefill_and_compress(
        self, model: torch.nn.Module, input_ids: list[int], budget: float
    ) -> tuple[KVBenchCache, torch.Tensor]:
        """For methods whose needs() declare own_prefill: prefill while compressing (see
        `kvbench.harness.engine.prefill.streaming_prefill`); return the cache, whole context in its prefixes,
        and the next-token logits after the context."""
        raise NotImplementedError(f"{self.name} compresses from the shared prefill; call compress()")


class Method(Calibration, DecodeTime, OwnPrefill, ABC):
    """Base class of every compression method: set `name`, `family`, `description`, `Config`; write `_compress`."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type]

    @abstractmethod
    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        """Compress the observed context to at most `budget` of its full-cache bytes (budget already checked)."""

    def needs(self) -> ObservationNeeds:
        """What the prefill must collect for this method (keys and values always come)."""
        return ObservationNeeds()

    # False for methods that keep everything whatever the budget (full): sweeps run them once.
    uses_budget: ClassVar[bool] = True
    # Raised whenever a change of the code changes what the method keeps or outputs for the same config: part of
    # every row's identity, so a store never counts rows of the older algorithm as finished cells of the new one.
    version: ClassVar[int] = 1

    def __init__(self, config: Any = None, **overrides: Any):
        base = config if config is not None else self.Config()
        fields = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise KVBenchError(
                f"{self.name} has no option {', '.join(unknown)}; its options are {', '.join(sorted(fields)) or 'none'}"
            )
        try:
            # Every field against its declared values first (in field order), then the config's own checks of
            # several fields together (its __post_init__).
            check_values(type(base), {**{name: getattr(base, name) for name in fields}, **overrides})
            self.config = dataclasses.replace(base, **overrides)
        except OptionError as error:
            raise OptionError(f"{self.name}: {error}") from None
        except (TypeError, ValueError) as error:
            raise KVBenchError(f"{self.name}: {error}; its options (defaults): {_defaults(type(base))}") from None

    def compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        """What the harness calls: `_compress` after the budget is checked to lie in (0, 1]. On a model with
        sliding-window layers shorter than the context, those keep their windows and `_compress` gets the budget
        left for the other layers (`kvbench.harness.engine.windows`)."""
        budget = check_budget(budget)
        windows.refuse_what_windows_break(self, observation)
        rest = windows.budget_for_the_rest(observation, budget, self.label) if self.uses_budget else budget
        return windows.with_windows(observation, self._compress(observation, rest))

    @property
    def label(self) -> str:
        """The name plus the options that differ from the defaults: what tells two configurations apart."""
        return method_label(self.name, self.config)

    def config_record(self) -> dict[str, Any]:
        """Every config field as JSON: the method's part of a row's identity."""
        return method_config(self.config)

    def artifact_fingerprint(self) -> str | None:
        """A fingerprint of the calibration or training artifact this instance uses (None if it uses none); the
        harness sets it when it hands the artifact over, and every row that used it records it."""
        return getattr(self, "_artifact_fingerprint", None)


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its name (built-in modules and plug-ins alike)."""
    other = REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(
            f"method name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is taken by "
            f"{other.__module__}.{other.__qualname__}; rename one"
        )
    REGISTRY[cls.name] = cls
    return cls


def _defaults(config_type: type) -> str:
    from kvbench.harness.method_spec import _option_list

    return _option_list(config_type)


def get_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method from its name or a `NAME:option=value:...` spec (typed from the config's
    defaults); an unknown name lists the valid ones, an unknown option or bad value lists the options."""
    from kvbench.methods import failed_plugins, load_all

    load_all()
    spec = parse_method_spec(name)
    if spec.name not in REGISTRY:
        failed = failed_plugins()
        hint = f" (plug-ins that failed to load: {', '.join(sorted(failed))})" if failed else ""
        raise UnknownNameError(f"unknown method {spec.name!r}; valid methods: {', '.join(sorted(REGISTRY))}{hint}")
    cls = REGISTRY[spec.name]
    typed = configured_options(spec.name, cls.Config, spec)
    return cls(**{**typed, **options})

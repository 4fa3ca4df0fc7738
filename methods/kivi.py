"""KIVI: keys quantized per channel, values per token, a full-precision recent window (Liu et al., arXiv 2402.02750).

Every context token is kept, at low precision: the cache stores packed integer codes plus an fp16 scale and
minimum per group (`kvbench.harness.cache.quantized_prefix`), and dequantizes them at attention time, never storing
the result back. Keys are quantized after RoPE, as cached. The prefill attends to the exact keys and values;
the stored context is quantized once, afterwards (reference_methods.md §9). This is not transformers'
`QuantizedCache`, which quantizes both K and V per channel and re-quantizes on flushes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import LayerPrefix, Prefixes
from kvbench.harness.cache.quantized_prefix import BITS, QuantizedPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.method_spec import OptionError, option
from kvbench.methods.base import Method, register

# fp16 scale + fp16 minimum per group.
GROUP_METADATA_BYTES = 4


@dataclass(frozen=True)
class KIVIConfig:
    """arXiv 2402.02750 with the paper's G = 32 and R = 128 (reference_methods.md §9).

    key_bits / value_bits: 2, 4 or 8 (8 matters for fp32 caches, where 8 bits is a quarter of the bytes); 0
    lets the budget choose: the largest width (K and V alike when both are 0) whose cost with the paper's
    window fits the budget.

    Residual: keys are quantized in blocks of R tokens, so N mod R keys stay raw; the last R values stay raw.
    With `fill_budget` (default) the bytes the chosen width leaves under the budget keep more of the most
    recent tokens in full precision (`extra` tokens beyond the paper's window, the most the budget pays for), so
    the achieved ratio sits just under b instead of at the width's fixed ratio; `fill_budget=false` is the
    paper's window exactly. b = 1 is the full cache (nothing quantized). A budget below the narrowest width's
    cost with the paper's window is refused, naming the lowest reachable budget (all of a context shorter than
    R stays raw: only b = 1 is reachable there).

    While decoding, the question and generated tokens stream into the quantized cache as they age, as the paper's
    decoding does (`QuantizedPrefix.with_tail`): keys in blocks of R tokens once R of them are raw beyond the key
    window the budget chose (the paper's window: none, so N mod R keys stay raw), values once G of them are raw
    beyond the value window (the paper quantizes each value as it leaves the last R; kvbench does it G tokens at a
    time, so up to G − 1 more values stay raw). At b = 1 nothing is quantized, before or while decoding.
    """

    key_bits: int = option(0, choices=(0, 2, 4, 8))  # 0 or one of the quantized prefix's BITS
    value_bits: int = option(0, choices=(0, 2, 4, 8))
    group_size: int = option(32, at_least=1)
    residual: int = option(128, at_least=0)
    fill_budget: bool = True

    def __post_init__(self) -> None:
        if self.residual % self.group_size:
            raise OptionError(
                f"options residual={self.residual} and group_size={self.group_size} do not fit; residual must be a "
                "multiple of group_size (keys are quantized in blocks of residual tokens, groups of group_size)"
            )


@dataclass(frozen=True)
class KIVIStream:
    """One sequence's streaming windows while decoding (in its cache's `method_state`; plain integers, no bytes):
    raw keys past `key_window` are quantized `block` (R) tokens at a time, raw values past `value_window` once
    `chunk` (G) of them have aged."""

    key_window: int
    block: int
    value_window: int
    chunk: int


@dataclass(frozen=True)
class KIVIPlan:
    """What one context keeps: widths and how many tokens of keys/values are quantized (the rest stay raw)."""

    key_bits: int
    value_bits: int
    key_quantized: int
    value_quantized: int


def quantized_counts(n: int, residual: int, group: int, key_extra: int, value_extra: int) -> tuple[int, int]:
    """Tokens quantized: keys in whole blocks of R tokens (the paper's N mod R raw keys), less the groups of G
    tokens that fall in the last `key_extra`; values all but the last R + `value_extra`."""
    block = residual or group
    keys = min(block * (n // block), group * (max(n - key_extra, 0) // group))
    return keys, max(n - residual - value_extra, 0)


def layer_bytes(n: int, heads: int, dim: int, element: int, plan: KIVIPlan, group: int, value_group: int) -> int:
    """Bytes one layer's `QuantizedPrefix` stores: packed codes, fp16 scale + min per group, raw residuals."""
    nk, nv = plan.key_quantized, plan.value_quantized
    key = math.ceil(heads * nk * dim * plan.key_bits / 8) + heads * (nk // group) * dim * GROUP_METADATA_BYTES
    value = math.ceil(heads * nv * dim * plan.value_bits / 8) + heads * nv * (dim // value_group) * GROUP_METADATA_BYTES
    return key + value + heads * (2 * n - nk - nv) * dim * element


@register
class KIVI(Method):
    name = "kivi"
    family = "quantization"
    description = (
        "Keys per channel, values per token, asymmetric 2/4/8-bit codes packed, a full-precision recent window"
    )
    Config = KIVIConfig
    # 2: tokens decoded after the context stream into the quantized cache as they age (1 kept them raw).
    version = 2

    def _widths(self) -> list[tuple[int, int]]:
        key, value = self.config.key_bits, self.config.value_bits
        if not key and not value:
            return [(bits, bits) for bits in BITS]
        return [(k, v) for k in ([key] if key else BITS) for v in ([value] if value else BITS)]

    def plan(self, n: int, heads: int, dim: int, element: int, num_layers: int, budget: float) -> KIVIPlan:
        """The widths whose cost with the paper's window is closest to the budget from below, then the longest
        full-precision window the rest of the budget pays for (`fill_budget`)."""
        config = self.config
        value_group = min(config.group_size, dim)
        if budget >= 1.0:
            return KIVIPlan(BITS[-1], BITS[-1], 0, 0)
        cap = budget * 2 * num_layers * heads * n * dim * element

        def total(k: int, v: int, key_extra: int, value_extra: int) -> int:
            nk, nv = quantized_counts(n, config.residual, config.group_size, key_extra, value_extra)
            plan = KIVIPlan(k, v, nk, nv)
            return num_layers * layer_bytes(n, heads, dim, element, plan, config.group_size, value_group)

        def longest(fits, high: int) -> int:  # the largest extra window that fits (cost never falls as it grows)
            low = 0
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if fits(middle) else (low, middle - 1)
            return low

        costs = sorted(((total(k, v, 0, 0), k, v) for k, v in self._widths()), reverse=True)
        fitting = [cost for cost in costs if cost[0] <= cap]
        if not fitting:
            lowest = costs[-1][0] / (2 * num_layers * heads * n * dim * element)
            raise BudgetError(
                f"kivi at {costs[-1][1]}/{costs[-1][2]} bits with a {config.residual}-token full-precision window "
                f"keeps at least {lowest:.4f} of this {n}-token context, so budget {budget:g} is unreachable; the "
                f"lowest reachable budget is {math.ceil(lowest * 100) / 100:g}"
            )
        _, k, v = fitting[0]
        extra = longest(lambda e: total(k, v, e, e) <= cap, n if config.fill_budget else 0)
        # Keys go raw G tokens at a time: what is left of the budget after that pays for single value tokens.
        value_extra = longest(lambda e: total(k, v, extra, e) <= cap, n if config.fill_budget else 0)
        return KIVIPlan(k, v, *quantized_counts(n, config.residual, config.group_size, extra, value_extra))

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        config = self.config
        heads, dim = observation.num_kv_heads, observation.head_dim
        value_group = min(config.group_size, dim)
        if dim % value_group:
            raise KVBenchError(
                f"kivi's value groups of {value_group} channels do not divide head_dim {dim}; pick a group_size that does"
            )
        element = observation.keys[0].element_size()
        n = observation.context_length
        plan = self.plan(n, heads, dim, element, observation.num_layers, budget)
        block = config.residual or config.group_size
        stream = None
        if budget < 1.0:  # b = 1 is the full cache, also while decoding
            stream = KIVIStream((n - plan.key_quantized) // block * block, block, n - plan.value_quantized, value_group)
        prefixes = [
            QuantizedPrefix(
                keys,
                values,
                plan.key_bits,
                plan.value_bits,
                config.group_size,
                value_group,
                plan.key_quantized,
                plan.value_quantized,
            )
            for keys, values in zip(observation.keys, observation.values, strict=True)
        ]
        return Prefixes(prefixes, decode_state=stream)

    # A model's sliding-window layers keep their windows (TokenPrefix); only the quantized layers stream.
    leaves_windows = True

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        stream = cache.method_state
        return isinstance(stream, KIVIStream) and any(
            self._due(stream, layer, new_tokens) for layer in cache.layers if isinstance(layer.prefix, QuantizedPrefix)
        )

    @staticmethod
    def _due(stream: KIVIStream, layer, new_tokens: int = 0) -> bool:
        raw = layer.tail_length + new_tokens
        return (
            layer.prefix.key_residual.shape[1] + raw >= stream.key_window + stream.block
            or layer.prefix.value_residual.shape[1] + raw >= stream.value_window + stream.chunk
        )

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Quantize what aged past the windows: every quantized layer whose raw keys or values reached a block."""
        stream = cache.method_state
        if not isinstance(stream, KIVIStream):
            return
        for layer in cache.layers:
            if isinstance(layer.prefix, QuantizedPrefix) and self._due(stream, layer):
                prefix = layer.prefix.with_tail(
                    layer.keys[0], layer.values[0], stream.key_window, stream.block, stream.value_window, stream.chunk
                )
                layer.absorb_tail(prefix)

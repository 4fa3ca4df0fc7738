"""Integer codes for the cache: asymmetric min-max quantization in groups, codes packed into bytes.

A quantized tensor stores what a real low-bit cache stores and nothing else: the codes packed `8 // bits` to a
byte (four 2-bit codes, two 4-bit codes), plus one fp16 scale and one fp16 minimum per group, so `stored_bytes`
measures the true size. Codes are computed against the scale and minimum as stored (fp16, the minimum rounded
down and the scale up), so every element of a group dequantizes within half a step, s/2, of its value.

`QuantizedPrefix` is KIVI's layout (arXiv 2402.02750): keys per channel, values per token, and a window of the
most recent tokens kept in full precision; `with_tail` streams tokens decoded after the context into it as they age
past the window, as KIVI's decoding does.
"""

from __future__ import annotations

import torch

from kvbench.harness.cache.prefix import LayerPrefix, PrefixKV, _own

BITS = (2, 4, 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2^bits) → a flat uint8 tensor holding `8 // bits` codes per byte (the last byte padded)."""
    if bits not in BITS:
        raise ValueError(f"codes are packed at {BITS} bits, not {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return _own(flat)
    per_byte = 8 // bits
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per_byte)).reshape(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return _own((flat << shifts).sum(dim=1, dtype=torch.uint8))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of a `pack_codes` result, as a flat uint8 tensor."""
    if bits == 8:
        return packed[:count]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed[:, None] >> shifts) & mask).reshape(-1)[:count]


def _round_fp16(x: torch.Tensor, direction: float) -> torch.Tensor:
    """fp16 nearest to `x` on the side of `direction` (-inf: not above x, +inf: not below x)."""
    rounded = x.to(torch.float16)
    wrong = rounded.float() > x if direction < 0 else rounded.float() < x
    return torch.where(wrong, torch.nextafter(rounded, torch.full_like(rounded, direction)), rounded)


class QuantizedTensor:
    """Asymmetric min-max quantization of `x` in groups along its last axis (one group = the last axis).

    s = (max − min)/(2^bits − 1), q = round((x − min)/s), x̂ = q·s + min, with s and min kept in fp16 per group.
    Each tensor is quantized once, from the values given; `dequantize` never feeds back into the codes.
    """

    def __init__(self, x: torch.Tensor, bits: int):
        levels = (1 << bits) - 1
        work = x.float()
        minimum = _round_fp16(work.amin(dim=-1, keepdim=True), float("-inf"))
        scale = _round_fp16((work.amax(dim=-1, keepdim=True) - minimum.float()) / levels, float("inf"))
        steps = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        codes = torch.round((work - minimum.float()) / steps).clamp_(0, levels).to(torch.uint8)
        self.codes = pack_codes(codes, bits)
        self.scale, self.minimum = _own(scale), _own(minimum)
        self.bits = bits
        self.shape = tuple(x.shape)
        self.dtype = x.dtype

    def unpacked_codes(self) -> torch.Tensor:
        """The integer codes, shaped like the quantized tensor (for inspection and tests)."""
        count = 1
        for size in self.shape:
            count *= size
        return unpack_codes(self.codes, self.bits, count).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        codes = self.unpacked_codes().float()
        return (codes * self.scale.float() + self.minimum.float()).to(self.dtype)


def quantize_per_channel(x: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """[H, n, d] with n a multiple of `group`: each channel's groups of `group` consecutive tokens share (s, min)."""
    h, n, d = x.shape
    return QuantizedTensor(x.reshape(h, n // group, group, d).transpose(-1, -2), bits)


def dequantize_per_channel(q: QuantizedTensor) -> torch.Tensor:
    h, blocks, d, group = q.shape
    return q.dequantize().transpose(-1, -2).reshape(h, blocks * group, d)


def quantize_per_token(x: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """[H, n, d] with d a multiple of `group`: each token's groups of `group` consecutive channels share (s, min)."""
    h, n, d = x.shape
    return QuantizedTensor(x.reshape(h, n, d // group, group), bits)


def dequantize_per_token(q: QuantizedTensor) -> torch.Tensor:
    h, n, groups, group = q.shape
    return q.dequantize().reshape(h, n, groups * group)


class QuantizedPrefix(LayerPrefix):
    """KIVI's cache of one layer's context: quantized keys and values plus a full-precision recent window.

    Keys [H, N, d]: the first `key_quantized` tokens (a multiple of `group`) quantized per channel in groups of
    `group` tokens; the rest raw. Values: the first `value_quantized` tokens quantized per token in groups of
    `value_group` channels; the rest raw. Either count may be 0 (nothing quantized: the raw cache exactly).
    Tokens decoded after the context join it through `with_tail` (KIVI's streaming): then `key_blocks` and
    `value_blocks` hold the codes of tokens quantized while decoding, after the context's, in order.
    """

    first_position = 0  # every context token, in order

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_bits: int,
        value_bits: int,
        group: int,
        value_group: int,
        key_quantized: int,
        value_quantized: int,
    ):
        self.key_codes = quantize_per_channel(keys[:, :key_quantized], key_bits, group) if key_quantized else None
        self.key_residual = _own(keys[:, key_quantized:])
        self.value_codes = (
            quantize_per_token(values[:, :value_quantized], value_bits, value_group) if value_quantized else None
        )
        self.value_residual = _own(values[:, value_quantized:])
        self.key_bits, self.value_bits, self.group, self.value_group = key_bits, value_bits, group, value_group
        self.key_blocks: list[QuantizedTensor] = []
        self.value_blocks: list[QuantizedTensor] = []

    @property
    def num_heads(self) -> int:
        return int(self.key_residual.shape[0])

    def head_lengths(self) -> list[int]:
        codes = ([self.key_codes] if self.key_codes is not None else []) + self.key_blocks
        quantized = sum(c.shape[1] * c.shape[3] for c in codes)
        return [quantized + int(self.key_residual.shape[1])] * self.num_heads

    def materialize(self) -> PrefixKV:
        keys = [dequantize_per_channel(c) for c in [self.key_codes, *self.key_blocks] if c is not None]
        values = [dequantize_per_token(c) for c in [self.value_codes, *self.value_blocks] if c is not None]
        keys = torch.cat([*keys, self.key_residual], dim=1) if keys else self.key_residual
        values = torch.cat([*values, self.value_residual], dim=1) if values else self.value_residual
        return PrefixKV(keys, values)

    def with_tail(
        self, keys: torch.Tensor, values: torch.Tensor, key_window: int, block: int, value_window: int, chunk: int
    ) -> QuantizedPrefix:
        """This prefix followed by `keys`/`values` [H, t, d], tokens decoded after it, with the raw tokens that aged
        past the full-precision windows quantized, as KIVI streams them: once `key_window` + `block` keys or more are
        raw, the oldest whole blocks of `block` tokens beyond the window are quantized per channel (groups of
        `group` tokens); once `value_window` + `chunk` values or more are raw, all but the newest `value_window` are
        quantized per token. Codes already stored are kept as they are (never requantized); the raw rest is copied."""
        raw_keys = torch.cat([self.key_residual, keys.to(self.key_residual.dtype)], dim=1)
        raw_values = torch.cat([self.value_residual, values.to(self.value_residual.dtype)], dim=1)
        aged_keys = raw_keys.shape[1] - key_window
        quantized_keys = block * (aged_keys // block) if aged_keys >= block else 0
        aged_values = raw_values.shape[1] - value_window
        quantized_values = aged_values if aged_values >= chunk else 0
        out = object.__new__(QuantizedPrefix)
        vars(out).update(vars(self))
        out.key_blocks, out.value_blocks = list(self.key_blocks), list(self.value_blocks)
        if quantized_keys:
            out.key_blocks.append(quantize_per_channel(raw_keys[:, :quantized_keys], self.key_bits, self.group))
        if quantized_values:
            quantized = quantize_per_token(raw_values[:, :quantized_values], self.value_bits, self.value_group)
            out.value_blocks.append(quantized)
        out.key_residual = _own(raw_keys[:, quantized_keys:])
        out.value_residual = _own(raw_values[:, quantized_values:])
        return out

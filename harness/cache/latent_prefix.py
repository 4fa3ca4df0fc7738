"""Latent codes for the cache: each context key and value stored as a small latent, decoded at attention time.

The latents are what the cache holds for the context (in a float dtype, or quantized to integer codes with
`QuantizedTensor`); the decoder that turns them back into keys and values is a model-sized artifact shared by
every context, so the prefix refers to it through `LatentDecoder`, which `stored_bytes` does not walk (it has
no instance dict), and the method reports it once in `method_bytes` (DESIGN §3: never hidden, never in
kv_bytes).
"""

from __future__ import annotations

import torch

from kvbench.harness.cache.prefix import LayerPrefix, PrefixKV, _own
from kvbench.harness.cache.quantized_prefix import QuantizedTensor


class LatentDecoder:
    """One layer's decoder for keys or values: x̂ = z·W + b, with W [H_w, m, d] and b [H_w, 1, d], H_w = 1 (shared
    by the layer's KV heads) or H_kv (one per head). Model-sized: counted in `method_bytes`, not in the cache."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight, self.bias = weight, bias

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.weight + self.bias


def _store(latents: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor | QuantizedTensor:
    """Latents [H, n, m] as kept: a float tensor of `dtype` (bits 16 or 32), or asymmetric integer codes with an
    fp16 scale and zero point per vector (group 0) or per group of `group` latent channels."""
    if bits >= 16:
        return _own(latents.to(dtype))
    h, n, m = latents.shape
    size = group or m
    return QuantizedTensor(latents.reshape(h, n, m // size, size), bits)


class LatentPrefix(LayerPrefix):
    """One layer's context as latents: [H, N, m] per K and V, encoded once from the cached (post-RoPE) keys and
    values and never re-encoded; `materialize` decodes them for attention and keeps nothing it decoded.

    Tokens decoded after the context join it through `with_tail` as they age past a raw window, encoded once by the
    method's encoder (the streaming form of KIVI's window): `key_blocks`/`value_blocks` hold their latents, after the
    context's, and `key_residual`/`value_residual` the raw tokens not yet encoded ([H, r, d], empty at compression).
    """

    first_position = 0  # every context token, in order

    def __init__(
        self,
        key_latents: torch.Tensor,
        value_latents: torch.Tensor,
        key_decoder: LatentDecoder,
        value_decoder: LatentDecoder,
        bits: int,
        group: int,
        latent_dtype: torch.dtype,
        dtype: torch.dtype,
    ):
        self.key_latents = _store(key_latents, bits, group, latent_dtype)
        self.value_latents = _store(value_latents, bits, group, latent_dtype)
        self.key_decoder, self.value_decoder = key_decoder, value_decoder
        self.dtype = dtype
        self._shape = (int(key_latents.shape[0]), int(key_latents.shape[1]))
        self.bits, self.group, self.latent_dtype = bits, group, latent_dtype
        self.key_blocks: list[torch.Tensor | QuantizedTensor] = []
        self.value_blocks: list[torch.Tensor | QuantizedTensor] = []
        empty = (self._shape[0], 0, int(key_decoder.weight.shape[-1]))
        self.key_residual = torch.empty(empty, dtype=dtype, device=key_latents.device)
        self.value_residual = torch.empty(
            (*empty[:2], int(value_decoder.weight.shape[-1])), dtype=dtype, device=value_latents.device
        )

    @property
    def num_heads(self) -> int:
        return self._shape[0]

    def head_lengths(self) -> list[int]:
        encoded = self._shape[1] + sum(_length(block) for block in self.key_blocks)
        return [encoded + int(self.key_residual.shape[1])] * self._shape[0]

    @staticmethod
    def _latents(stored: torch.Tensor | QuantizedTensor) -> torch.Tensor:
        if isinstance(stored, QuantizedTensor):
            h, n, groups, size = stored.shape
            return stored.dequantize().float().reshape(h, n, groups * size)
        return stored.float()

    def materialize(self) -> PrefixKV:
        keys = self._decoded(self.key_decoder, [self.key_latents, *self.key_blocks], self.key_residual)
        values = self._decoded(self.value_decoder, [self.value_latents, *self.value_blocks], self.value_residual)
        return PrefixKV(keys, values)

    def _decoded(self, decoder: LatentDecoder, stored: list, residual: torch.Tensor) -> torch.Tensor:
        latents = [self._latents(block) for block in stored]
        decoded = decoder(latents[0] if len(latents) == 1 else torch.cat(latents, dim=1)).to(self.dtype)
        return torch.cat([decoded, residual], dim=1) if residual.shape[1] else decoded

    def with_tail(self, keys: torch.Tensor, values: torch.Tensor, encode, window: int, chunk: int) -> LatentPrefix:
        """This prefix followed by `keys`/`values` [H, t, d], tokens decoded after it: once `window` + `chunk` tokens
        or more are raw, all but the newest `window` are encoded (`encode(which, x)` → latents [H, r, m], which = 0
        for keys, 1 for values) and stored like the context's latents; the rest stays raw. Latents already stored
        are kept as they are (never re-encoded)."""
        raw_keys = torch.cat([self.key_residual, keys.to(self.dtype)], dim=1)
        raw_values = torch.cat([self.value_residual, values.to(self.dtype)], dim=1)
        aged = raw_keys.shape[1] - window
        out = object.__new__(LatentPrefix)
        vars(out).update(vars(self))
        out.key_blocks, out.value_blocks = list(self.key_blocks), list(self.value_blocks)
        if aged < chunk:
            aged = 0
        else:
            for which, raw, blocks in ((0, raw_keys, out.key_blocks), (1, raw_values, out.value_blocks)):
                blocks.append(_store(encode(which, raw[:, :aged].float()), self.bits, self.group, self.latent_dtype))
        out.key_residual, out.value_residual = _own(raw_keys[:, aged:]), _own(raw_values[:, aged:])
        return out


def _length(stored: torch.Tensor | QuantizedTensor) -> int:
    return int(stored.shape[1])

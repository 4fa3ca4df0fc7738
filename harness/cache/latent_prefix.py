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

    Tokens decoded after the context are not encoded: they stay in the cache's uncompressed tail, as for every
    method (the cache seam).
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

    @property
    def num_heads(self) -> int:
        return self._shape[0]

    def head_lengths(self) -> list[int]:
        return [self._shape[1]] * self._shape[0]

    @staticmethod
    def _latents(stored: torch.Tensor | QuantizedTensor) -> torch.Tensor:
        if isinstance(stored, QuantizedTensor):
            h, n, groups, size = stored.shape
            return stored.dequantize().float().reshape(h, n, groups * size)
        return stored.float()

    def materialize(self) -> PrefixKV:
        keys = self.key_decoder(self._latents(self.key_latents)).to(self.dtype)
        values = self.value_decoder(self._latents(self.value_latents)).to(self.dtype)
        return PrefixKV(keys, values)

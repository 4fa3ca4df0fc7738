"""The compressed KV cache: per layer, a compressed context prefix plus an uncompressed tail.

`KVBenchCache` is a transformers `Cache` whose layers store the tail (question and generated tokens)
like a dynamic cache and keep the context in a method's representation (`LayerPrefix`). The model's
attention modules call `update`, which only grows the tail; kvbench's attention function
(`kvbench.harness.cache.attention`) then attends over prefix and tail together. Positions are logical:
`get_seq_length` counts the original context, so new tokens continue at context length + t.
"""

from __future__ import annotations

import inspect
from functools import cache as _memoize

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.harness.cache.prefix import LayerPrefix, stored_bytes


class CompressedLayer(CacheLayerMixin):
    """One layer: an optional compressed prefix covering `prefix_length` context positions, plus a raw tail.

    The tail grows into preallocated room ([1, H, capacity, d] buffers; `keys`/`values` are views of the tokens
    held): a decode step writes its token's key and value in place instead of copying the whole tail. The room is
    what `reserve` asked for (the question plus the tokens still to decode), else it doubles when full.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, prefix: LayerPrefix | None = None, prefix_length: int = 0):
        self._key_room = self._value_room = None
        self._length = self._value_length = 0
        self._reserved = 0
        super().__init__()
        self.prefix = prefix
        self.prefix_length = prefix_length

    # The tail: views of the tokens held. Assigning a tensor makes it the whole room (no spare capacity).
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_room is None else self._key_room[..., : self._length, :]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._key_room = tensor
        self._length = 0 if tensor is None else int(tensor.shape[-2])

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_room is None else self._value_room[..., : self._value_length, :]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._value_room = tensor
        self._value_length = 0 if tensor is None else int(tensor.shape[-2])

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` more tail tokens is allocated at the next update that needs any."""
        self._reserved = self._length + max(0, int(tokens))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        capacity = max(needed, self._reserved, 2 * int(self._key_room.shape[-2]))
        length = self._length
        keys, values = self._key_room, self._value_room
        self._key_room = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
        self._value_room = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
        self._key_room[..., :length, :] = keys[..., :length, :]
        self._value_room[..., :length, :] = values[..., :length, :]
        self._value_length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self._length, int(key_states.shape[-2])
        if start + new > self._key_room.shape[-2]:
            self._grow(start + new)
        self._key_room[..., start : start + new, :] = key_states
        self._value_room[..., start : start + new, :] = value_states
        self._length = self._value_length = start + new
        return self.keys, self.values

    @property
    def tail_length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def get_seq_length(self) -> int:
        return self.prefix_length + self.tail_length

    @property
    def first_position(self) -> int | None:
        """The original position of the prefix's first entry when its entries are a contiguous run of positions
        (the whole context, a sliding window's last tokens); None when the representation does not say which
        positions it kept. A sliding window is measured on these positions."""
        return getattr(self.prefix, "first_position", None) if self.prefix is not None else None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens of the tail (e.g. to answer another question from the same compressed context)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tail tokens to remove")
        if tokens_to_remove == 0 or self.keys is None:
            return
        # Copies, not views: a view would keep the dropped tokens' storage alive (and counted).
        self.keys = self.keys[..., :tokens_to_remove, :].clone()
        self.values = self.values[..., :tokens_to_remove, :].clone()

    def absorb_tail(self, prefix: LayerPrefix) -> None:
        """Replace the prefix by one that now also covers the tail (a method recompressed prefix + tail).

        Positions stay logical: the prefix now stands for prefix_length + tail_length positions, so later
        tokens still continue after everything seen so far.
        """
        self.prefix_length += self.tail_length
        self.prefix = prefix
        self.reset_tail()

    def reset_tail(self) -> None:
        """Empty the tail, freeing its storage (an empty view would keep it alive, and counted)."""
        if self.keys is not None:
            self.keys = self.keys.new_empty((*self.keys.shape[:-2], 0, self.keys.shape[-1]))
            self.values = self.values.new_empty((*self.values.shape[:-2], 0, self.values.shape[-1]))


class KVBenchCache(Cache):
    """A cache of `CompressedLayer`s; built empty for a prefill, or from a method's prefixes for decoding."""

    def __init__(
        self,
        num_layers: int,
        prefixes: list[LayerPrefix] | None = None,
        context_length: int = 0,
        method_state: object | None = None,
    ):
        if prefixes is not None and len(prefixes) != num_layers:
            raise ValueError(f"expected {num_layers} layer prefixes, got {len(prefixes)}")
        layers = [
            CompressedLayer(prefixes[i] if prefixes is not None else None, context_length if prefixes else 0)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.context_length = context_length
        # Set by the prefill engine: collects the observations the methods declared while attention runs.
        self.recorder = None
        # What each layer's attention applies (scaling, window, cap, sinks), as its module last asked for it.
        self.attention: list = [None] * num_layers
        # What a method keeps for this sequence between decode steps (positions, merge counts, query logs, score
        # accumulators): it lives here, with the sequence, so that `kv_bytes` measures it (DESIGN §3).
        self.method_state = method_state if method_state is not None else getattr(prefixes, "decode_state", None)

    def kv_bytes(self) -> int:
        """Bytes the compressed context holds, measured from the stored tensors: every layer's prefix and the
        method's decode state (each storage once)."""
        seen: set[int] = set()
        prefixes = sum(stored_bytes(layer.prefix, seen) for layer in self.layers if layer.prefix is not None)
        return prefixes + stored_bytes(self.method_state, seen)

    def held_bytes(self) -> int:
        """Everything the cache holds now: `kv_bytes` plus the raw tail's tokens (question and generated tokens;
        the tail's spare room, at most the tokens a decode reserved, is not counted)."""
        seen: set[int] = set()
        total = sum(stored_bytes(layer.prefix, seen) for layer in self.layers if layer.prefix is not None)
        total += stored_bytes(self.method_state, seen)
        # The tail's tokens, not the room reserved for the tokens still to come.
        tails = [t for layer in self.layers if layer.keys is not None for t in (layer.keys, layer.values)]
        return total + sum(t.numel() * t.element_size() for t in tails)

    def reset_tail(self) -> None:
        """Forget question and generated tokens, keeping the compressed context."""
        for layer in self.layers:
            layer.reset_tail()

    def reserve(self, tokens: int) -> None:
        """Let every layer's tail grow by `tokens` without reallocating (a decode: question + new tokens)."""
        for layer in self.layers:
            layer.reserve(tokens)


@_memoize
def _cache_parameter(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model: torch.nn.Module, cache: Cache) -> dict[str, Cache]:
    """The cache as the keyword argument the model's forward takes it by.

    transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns, then goes away in
    5.40); kvbench supports releases on both sides of the rename.
    """
    return {_cache_parameter(type(model)): cache}

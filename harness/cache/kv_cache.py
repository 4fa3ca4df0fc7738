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

from kvbench.harness.cache.prefix import LayerPrefix, TokenPrefix, stored_bytes


class CompressedLayer(CacheLayerMixin):
    """One layer: an optional compressed prefix covering `prefix_length` context positions, plus a raw tail.

    The tail grows into preallocated room ([1, H, capacity, d] buffers; `keys`/`values` are views of the tokens
    held): a decode step writes its token's key and value in place instead of copying the whole tail. The room is
    what `reserve` asked for (the question plus the tokens still to decode), else it doubles when full.

    A plain token prefix of equal-length heads (the full cache, every uniform eviction: keys [H, n, d], no bias)
    is *joined* at the first update: the room then holds the prefix's n tokens ahead of the tail, copied in once,
    and the prefix's keys and values become views of them. Attention reads prefix and tail as one tensor where
    they lie (`joint`), the single SDPA call transformers makes over its own cache without transformers' copy of
    the whole cache per step; `kv_bytes` still counts the prefix's own bytes, not the room.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, prefix: LayerPrefix | None = None, prefix_length: int = 0):
        self._key_room = self._value_room = None
        self._length = self._value_length = 0
        self._reserved = 0
        self._joined = 0  # prefix tokens held at the head of the room (0: the prefix lives in its own tensors)
        super().__init__()
        self.prefix = prefix
        self.prefix_length = prefix_length

    # The tail: views of the tokens held. Assigning a tensor makes it the whole room (no spare capacity).
    @property
    def keys(self) -> torch.Tensor | None:
        if self._key_room is None:
            return None
        return self._key_room[..., self._joined : self._joined + self._length, :]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._unjoin()
        self._key_room = tensor
        self._length = 0 if tensor is None else int(tensor.shape[-2])

    @property
    def values(self) -> torch.Tensor | None:
        if self._value_room is None:
            return None
        return self._value_room[..., self._joined : self._joined + self._value_length, :]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._unjoin()
        self._value_room = tensor
        self._value_length = 0 if tensor is None else int(tensor.shape[-2])

    @property
    def joined(self) -> int:
        """Prefix tokens per head held at the head of the room, ahead of the tail (0 when not joined)."""
        return self._joined

    def joint(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prefix and tail as one [1, H, n + t, d] view each of the room (None unless the prefix is joined)."""
        if not self._joined:
            return None
        end = self._joined + self._length
        return self._key_room[..., :end, :], self._value_room[..., :end, :]

    def _joinable(self, key_states: torch.Tensor) -> bool:
        prefix = self.prefix
        return (
            type(prefix) is TokenPrefix
            and prefix.lengths is None
            and prefix.bias is None
            and self._length == 0
            and prefix.keys.dtype == key_states.dtype
            and prefix.keys.device == key_states.device
            and tuple(prefix.keys.shape[::2]) == (key_states.shape[1], key_states.shape[-1])
            and tuple(prefix.values.shape[::2]) == (key_states.shape[1], self._value_room.shape[-1])
        )

    def _join(self, new: int) -> None:
        """Copy the prefix into the head of a fresh room (once) and make its tensors views of it."""
        prefix, n = self.prefix, int(self.prefix.keys.shape[1])
        capacity = n + max(new, self._reserved)
        keys, values = self._key_room, self._value_room
        self._key_room = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
        self._value_room = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
        self._key_room[0, :, :n] = prefix.keys
        self._value_room[0, :, :n] = prefix.values
        self._joined = n
        self._point_prefix()

    def _point_prefix(self) -> None:
        n = self._joined
        self.prefix.keys, self.prefix.values = self._key_room[0, :, :n], self._value_room[0, :, :n]

    def _unjoin(self) -> None:
        """Give the prefix its own compact tensors again (before the room is replaced or emptied)."""
        if self._joined:
            self.prefix.keys = self.prefix.keys.clone()
            self.prefix.values = self.prefix.values.clone()
            self._joined = 0

    def prefix_bytes(self, seen: set[int]) -> int:
        """What `stored_bytes` counts for the prefix; a joined prefix counts its own tokens, not the room."""
        if self.prefix is None:
            return 0
        if not self._joined:
            return stored_bytes(self.prefix, seen)
        fresh = [t for t in (self._key_room, self._value_room) if t.untyped_storage().data_ptr() not in seen]
        seen.update(t.untyped_storage().data_ptr() for t in fresh)
        own = sum(
            view.numel() * view.element_size()
            for view, room in ((self.prefix.keys, self._key_room), (self.prefix.values, self._value_room))
            if any(room is t for t in fresh)
        )
        return own

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` more tail tokens is allocated at the next update that needs any."""
        self._reserved = self._length + max(0, int(tokens))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        """Room for `needed` tail tokens (after a joined prefix's), keeping what is held."""
        held = self._joined + self._length
        capacity = self._joined + max(needed, self._reserved, 2 * (int(self._key_room.shape[-2]) - self._joined))
        keys, values = self._key_room, self._value_room
        self._key_room = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
        self._value_room = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
        self._key_room[..., :held, :] = keys[..., :held, :]
        self._value_room[..., :held, :] = values[..., :held, :]
        self._value_length = self._length
        if self._joined:
            self._point_prefix()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self._length, int(key_states.shape[-2])
        if not self._joined and self._joinable(key_states):
            self._join(new)
        if self._joined + start + new > self._key_room.shape[-2]:
            self._grow(start + new)
        at = self._joined + start
        self._key_room[..., at : at + new, :] = key_states
        self._value_room[..., at : at + new, :] = value_states
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
        if self._joined:  # the room stays (reserved for the tokens to come); only held tokens are counted
            self._length = self._value_length = max(0, self._length + tokens_to_remove)
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
        self._joined = 0  # the old prefix's views go with it; the new one joins at the next update
        self.prefix = prefix
        self.reset_tail()

    def reset_tail(self) -> None:
        """Empty the tail, freeing its storage (an empty view would keep it alive, and counted); a joined prefix
        keeps its room, where the next tokens go."""
        if self._joined:
            self._length = self._value_length = 0
            return
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
        prefixes = sum(layer.prefix_bytes(seen) for layer in self.layers)
        return prefixes + stored_bytes(self.method_state, seen)

    def held_bytes(self) -> int:
        """Everything the cache holds now: `kv_bytes` plus the raw tail's tokens (question and generated tokens;
        the tail's spare room, at most the tokens a decode reserved, is not counted)."""
        seen: set[int] = set()
        total = sum(layer.prefix_bytes(seen) for layer in self.layers)
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

"""The compressed KV cache: per layer, a compressed context prefix plus an uncompressed tail.

`KVBenchCache` is a transformers `Cache` whose layers store the tail (question and generated tokens)
like a dynamic cache and keep the context in a method's representation (`LayerPrefix`). The model's
attention modules call `update`, which only grows the tail; kvbench's attention function
(`kvbench.harness.attention`) then attends over prefix and tail together. Positions are logical:
`get_seq_length` counts the original context, so new tokens continue at context length + t.
"""

from __future__ import annotations

import inspect
from functools import cache as _memoize

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.harness.prefix import LayerPrefix, TokenPrefix, stored_bytes


class _JoinedPrefix(TokenPrefix):
    """A uniform, unbiased token prefix that lives in the first positions of its layer's joined buffer (see
    `CompressedLayer`): keys and values [H, n, d] are views of that buffer, not copies."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self._num_heads = int(keys.shape[0])
        self.keys, self.values, self.bias, self.lengths = keys, values, None, None


def _joinable(prefix: LayerPrefix | None, key_states: torch.Tensor) -> bool:
    """Whether attention can read this prefix as the stored tokens it is, in the tail's dtype and device: then the
    layer keeps prefix and tail in one buffer, the layout a dynamic cache has, so no decode step copies the prefix."""
    return (
        type(prefix) is TokenPrefix
        and prefix.lengths is None
        and prefix.bias is None
        and key_states.shape[0] == 1
        and prefix.keys.dtype == key_states.dtype
        and prefix.keys.device == key_states.device
    )


# Tail positions a joined buffer reserves at least; it then doubles the tail's room, so growth is amortised.
_MIN_TAIL_ROOM = 64


class CompressedLayer(CacheLayerMixin):
    """One layer: an optional compressed prefix covering `prefix_length` context positions, plus a raw tail.

    When the prefix is a uniform, unbiased `TokenPrefix` (full, and every eviction that keeps as many tokens per
    head) in the tail's dtype, the first update moves it into a joined buffer [1, H, n + room, d] whose first n
    positions hold the prefix and whose next ones receive the tail: attention reads [prefix; tail] as one view,
    as over a dynamic cache, instead of concatenating the whole prefix in every layer at every step. The prefix
    is stored once (moved, not copied: the layer's prefix is then a view of the buffer); `prefix_bytes` counts
    its n positions, `held_bytes` the whole buffer, room included. Replacing the prefix (`absorb_tail`) or
    emptying the tail gives the buffer up again.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, prefix: LayerPrefix | None = None, prefix_length: int = 0):
        super().__init__()
        self._prefix = prefix
        self.prefix_length = prefix_length
        self._buffer: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def prefix(self) -> LayerPrefix | None:
        return self._prefix

    @prefix.setter
    def prefix(self, prefix: LayerPrefix | None) -> None:
        if self._buffer is not None:
            self._split(keep_prefix=False)
        self._prefix = prefix

    @property
    def joined(self) -> bool:
        return self._buffer is not None

    def joined_states(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[1, H, n + t, d] keys and values (views of the joined buffer) and n, the prefix's positions."""
        n = int(self._prefix.keys.shape[1])
        end = n + self.tail_length
        keys, values = self._buffer
        return keys[:, :, :end], values[:, :, :end], n

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._buffer is None and _joinable(self._prefix, key_states):
            self._join(key_states.shape[-2])
        if self._buffer is not None:
            self._append(key_states, value_states)
            return self.keys, self.values
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def _join(self, incoming: int) -> None:
        self._rebuffer(self.tail_length + incoming)

    def _rebuffer(self, tail_needed: int) -> None:
        """Move prefix and tail into a new joined buffer with room for `tail_needed` tail positions and as many
        again (at least `_MIN_TAIL_ROOM`)."""
        prefix_keys, prefix_values = self._prefix.keys, self._prefix.values
        n, t = int(prefix_keys.shape[1]), self.tail_length
        capacity = n + tail_needed + max(tail_needed, _MIN_TAIL_ROOM)
        buffers = []
        for prefix, tail in ((prefix_keys, self.keys), (prefix_values, self.values)):
            buffer = tail.new_empty((1, prefix.shape[0], capacity, prefix.shape[-1]))
            buffer[0, :, :n] = prefix
            buffer[:, :, n : n + t] = tail
            buffers.append(buffer)
        self._buffer = (buffers[0], buffers[1])
        self._prefix = _JoinedPrefix(buffers[0][0, :, :n], buffers[1][0, :, :n])
        self._set_tail(n, t)

    def _set_tail(self, n: int, t: int) -> None:
        keys, values = self._buffer
        self.keys, self.values = keys[:, :, n : n + t], values[:, :, n : n + t]

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, t = int(self._prefix.keys.shape[1]), self.tail_length
        new = key_states.shape[-2]
        if n + t + new > self._buffer[0].shape[2]:
            self._rebuffer(t + new)
        keys, values = self._buffer
        keys[:, :, n + t : n + t + new] = key_states
        values[:, :, n + t : n + t + new] = value_states
        self._set_tail(n, t + new)

    def _split(self, keep_prefix: bool) -> None:
        """Give the joined buffer up: the tail (and, if kept, the prefix) as compact copies of their own."""
        if keep_prefix:
            self._prefix = TokenPrefix(self._prefix.keys.clone(), self._prefix.values.clone())
        self.keys, self.values = self.keys.clone(), self.values.clone()
        self._buffer = None

    def prefix_bytes(self, seen: set[int]) -> int:
        """Bytes the compressed prefix holds: its stored tensors, or, moved into the joined buffer, exactly its n
        positions there (the rest of that storage is the tail's and counts in `held_bytes` only)."""
        if self._prefix is None:
            return 0
        if self._buffer is None:
            return stored_bytes(self._prefix, seen)
        keys, values = self._prefix.keys, self._prefix.values
        return keys.numel() * keys.element_size() + values.numel() * values.element_size()

    @property
    def tail_length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def get_seq_length(self) -> int:
        return self.prefix_length + self.tail_length

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
        if self._buffer is not None:  # the buffer's room stays allocated (and counted in held_bytes)
            self._set_tail(int(self._prefix.keys.shape[1]), max(self.tail_length + tokens_to_remove, 0))
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
        if self._buffer is not None:
            self._split(keep_prefix=True)
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
        """Everything the cache holds now: `kv_bytes` plus the raw tail (question and generated tokens)."""
        seen: set[int] = set()
        total = sum(stored_bytes(layer.prefix, seen) for layer in self.layers if layer.prefix is not None)
        total += stored_bytes(self.method_state, seen)
        tails = [(layer.keys, layer.values) for layer in self.layers if layer.keys is not None]
        return total + stored_bytes(tails, seen)

    def reset_tail(self) -> None:
        """Forget question and generated tokens, keeping the compressed context."""
        for layer in self.layers:
            layer.reset_tail()


@_memoize
def _cache_parameter(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model: torch.nn.Module, cache: Cache) -> dict[str, Cache]:
    """The cache as the keyword argument the model's forward takes it by.

    transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns, then goes away in
    5.40); kvbench supports releases on both sides of the rename.
    """
    return {_cache_parameter(type(model)): cache}

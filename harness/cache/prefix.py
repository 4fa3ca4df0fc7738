"""Compressed context representations: what a method leaves in the cache for one layer.

Every representation answers one question at attention time: which keys, values and per-token logit
biases does each KV head attend to? Between steps it holds only its compressed form, and the harness
measures its bytes from the tensors it stores (`stored_bytes`), so a representation cannot understate
what it keeps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

Heads = torch.Tensor | list[torch.Tensor]


@dataclass
class PrefixKV:
    """Keys, values and optional logit bias per KV head, ready for attention.

    Uniform prefixes give tensors shaped [H, n, d] (bias [H, n]); ragged ones give a list with one
    [n_h, d] tensor ([n_h] for bias) per head (`materialize`), or, for attention, the packed tensors [Σ n_h, d]
    (bias [Σ n_h]) with `lengths` [H] (`attention_inputs`), so ragged heads are never padded.
    """

    keys: Heads
    values: Heads
    bias: Heads | None = None
    lengths: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return isinstance(self.keys, torch.Tensor) and self.lengths is None


class Prefixes(list):
    """One `LayerPrefix` per layer, as a method's compress returns them, plus the state the method keeps for this
    sequence while it decodes (None for methods that compress once). The harness puts that state in the cache
    (`KVBenchCache.method_state`), where `kv_bytes` measures it, never on the method object."""

    def __init__(self, prefixes=(), decode_state: object | None = None):
        super().__init__(prefixes)
        self.decode_state = decode_state


class LayerPrefix(ABC):
    """The compressed context of one layer, in a method's own representation."""

    # The original position of the first entry when the entries are a contiguous run of context positions (every
    # token from 0, a sliding window's last tokens); None when the representation does not record positions.
    first_position: int | None = None

    @property
    @abstractmethod
    def num_heads(self) -> int: ...

    @abstractmethod
    def head_lengths(self) -> list[int]:
        """Number of attended positions per KV head (kept tokens, merged tokens or all tokens)."""

    @abstractmethod
    def materialize(self) -> PrefixKV:
        """Keys/values to attend to now; decompression happens here, never stored back."""

    def attention_inputs(self) -> PrefixKV:
        """What attention reads for this layer in this step: `materialize()`, except that ragged heads may come
        packed ([Σ n_h, d] + lengths) as they are stored, read where they lie rather than split into a list."""
        return self.materialize()


def _own(t: torch.Tensor) -> torch.Tensor:
    """A compact copy when `t` views a larger storage, so that dropped tokens are really freed."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


class TokenPrefix(LayerPrefix):
    """Kept or merged tokens per KV head, ragged across heads.

    Equal head lengths are stored as one [H, n, d] tensor; unequal ones are packed as [sum n_h, d]
    plus an int32 length per head (the way varlen attention kernels store them), never padded.
    `bias` is an additive logit bias per stored token, e.g. ln(count) for a merged token.
    """

    def __init__(self, keys: Heads, values: Heads, bias: Heads | None = None, first_position: int | None = None):
        if first_position is not None:
            self.first_position = first_position
        if isinstance(keys, torch.Tensor):
            if values.shape[:2] != keys.shape[:2] or (bias is not None and bias.shape != keys.shape[:2]):
                raise ValueError("keys, values and bias must keep the same tokens per head")
            self._num_heads = int(keys.shape[0])
            self.keys, self.values = _own(keys), _own(values)
            self.bias = _own(bias) if bias is not None else None
            self.lengths = None
            return
        lengths = [int(k.shape[0]) for k in keys]
        if [int(v.shape[0]) for v in values] != lengths:
            raise ValueError("keys and values must keep the same tokens per head")
        if bias is not None and [int(b.shape[0]) for b in bias] != lengths:
            raise ValueError("bias must have one entry per stored token")
        self._num_heads = len(keys)
        if len(set(lengths)) == 1:
            self.keys = _own(torch.stack(keys))
            self.values = _own(torch.stack(values))
            self.bias = _own(torch.stack(bias)) if bias is not None else None
            self.lengths = None
        else:
            self.keys = _own(torch.cat(keys))
            self.values = _own(torch.cat(values))
            self.bias = _own(torch.cat(bias)) if bias is not None else None
            self.lengths = torch.tensor(lengths, dtype=torch.int32)

    @property
    def num_heads(self) -> int:
        return self._num_heads

    def head_lengths(self) -> list[int]:
        if self.lengths is None:
            return [int(self.keys.shape[1])] * self._num_heads
        return self.lengths.tolist()

    def materialize(self) -> PrefixKV:
        if self.lengths is None:
            return PrefixKV(self.keys, self.values, self.bias)
        sizes = self.lengths.tolist()
        bias = list(self.bias.split(sizes)) if self.bias is not None else None
        return PrefixKV(list(self.keys.split(sizes)), list(self.values.split(sizes)), bias)

    def attention_inputs(self) -> PrefixKV:
        if self.lengths is None:
            return PrefixKV(self.keys, self.values, self.bias)
        return PrefixKV(self.keys, self.values, self.bias, self.lengths)


Bases = torch.Tensor | list[torch.Tensor | None]


def _project(states: torch.Tensor, basis: Bases) -> tuple[Heads, Bases]:
    """Codes and the bases to keep: one [H, n, r] block for uniform ranks, else one tensor per head.

    A per-head basis of None keeps that head's d channels as they are: at full rank a basis buys nothing but
    its own d² bytes, so such heads store no basis at all.
    """
    if isinstance(basis, torch.Tensor):
        return _own(states @ basis), _own(basis)
    codes = [_own(head if b is None else head @ b) for head, b in zip(states, basis, strict=True)]
    return codes, [None if b is None else _own(b) for b in basis]


def _restore(codes: Heads, basis: Bases) -> torch.Tensor:
    """[H, n, d] channels back from the codes: every head has the same tokens, only ranks differ."""
    if isinstance(codes, torch.Tensor):
        return codes @ basis.transpose(-1, -2)
    return torch.stack([c if b is None else c @ b.transpose(0, 1) for c, b in zip(codes, basis)])


class LowRankPrefix(LayerPrefix):
    """Channel reduction: per KV head, keys and values projected onto orthonormal bases.

    With bases given as [H, d, r] tensors (one rank for every head) it stores K·B_k ([H, n, r_k]),
    V·B_v ([H, n, r_v]) and the bases. With bases given as a list of [d, r_h] per head (ranks differ per
    head) it stores one code tensor [n, r_h] and one basis per head, never padded to a common rank; a
    head whose basis is None keeps its raw [n, d] channels and no basis. Attention uses
    K ≈ (K·B_k)·B_kᵀ, exact when the bases span the head's key/value space (full rank).
    """

    first_position = 0  # every context token, in order

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, key_basis: Bases, value_basis: Bases):
        self.key_codes, self.key_basis = _project(keys, key_basis)
        self.value_codes, self.value_basis = _project(values, value_basis)

    @property
    def num_heads(self) -> int:
        return len(self.key_codes)

    def head_lengths(self) -> list[int]:
        return [int(codes.shape[0]) for codes in self.key_codes]

    def materialize(self) -> PrefixKV:
        return PrefixKV(_restore(self.key_codes, self.key_basis), _restore(self.value_codes, self.value_basis))


def stored_bytes(obj: object, _seen: set[int] | None = None) -> int:
    """Bytes of every tensor storage reachable from `obj`, each storage counted once.

    Walking the object's attributes rather than asking it for a size keeps methods honest: whatever a
    representation holds (indices, scales, biases, bases, decode state) is counted, views count their whole
    storage. `_seen` holds the storages and containers already walked, so shared tensors and cycles count once.
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
        return 0
    marker = -id(obj) - 1  # negative: never a storage's data pointer
    if marker in seen:
        return 0
    seen.add(marker)
    if isinstance(obj, dict):
        return sum(stored_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(stored_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(stored_bytes(v, seen) for v in vars(obj).values())
    return 0

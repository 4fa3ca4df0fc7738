"""Several sequences' compressed caches side by side, for one forward pass per generated token over all of them.

A `BatchedCache` is what the model sees when rows decode together: row b of every batch tensor belongs to
`rows[b]`, a `KVBenchCache` of its own (its method's prefix representation, its own tail, its own method state
and query recorder). `update` hands each row its slice; kvbench's attention then attends each row over its own
prefix and tail (`kvbench.harness.cache.attention`). Nothing is stacked or padded between steps: the rows' caches stay
exactly what they would be decoding alone, so per-row decode hooks work on them unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.harness.cache.kv_cache import KVBenchCache


class _RowsLayer(CacheLayerMixin):
    """Layer `index` of every row: sizes are asked of the rows, updates routed to them."""

    is_sliding = False
    is_compileable = False

    def __init__(self, rows: list[KVBenchCache], index: int):
        super().__init__()
        self.rows, self.index = rows, index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        for b, row in enumerate(self.rows):
            row.layers[self.index].update(key_states[b : b + 1], value_states[b : b + 1])
        return key_states, value_states

    def get_seq_length(self) -> int:
        return max(row.layers[self.index].get_seq_length() for row in self.rows)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class BatchedCache(Cache):
    """The rows of one decode batch; row b's cache is `rows[b]`."""

    def __init__(self, rows: list[KVBenchCache]):
        if not rows:
            raise ValueError("a batch needs at least one row")
        num_layers = len(rows[0].layers)
        if any(len(row.layers) != num_layers for row in rows):
            raise ValueError("every row of a batch must have one cache layer per model layer")
        super().__init__(layers=[_RowsLayer(rows, i) for i in range(num_layers)])
        self.rows = rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if key_states.shape[0] != len(self.rows):
            raise ValueError(f"a batch of {len(self.rows)} rows got {key_states.shape[0]} sequences")
        return self.layers[layer_idx].update(key_states, value_states)

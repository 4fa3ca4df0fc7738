"""One context, many questions (kvpress's grouping, SCBench's shared contexts): the context is prefilled once and
compressed once per (method, budget); every question is answered from that same compressed cache, restored
between questions, so the compression is query-agnostic and each answer equals the one a separate run of the
cell gives.

Restoring is a copy: each question decodes on a deep copy of the cache as compression left it, so whatever a
question and its answer add (the raw tail, a decode-time method's evictions and state) never reaches the next.
With `batch_size` > 1 the questions of one cell decode that many at a time in one batch (`batched_greedy_decode`,
each row its own copy), each answer the one it gets alone.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence

from kvbench.harness.engine.pipeline import (
    CellResult,
    CompressedContext,
    TimedObservation,
    compress_context,
    decode_batch,
    iter_cells,
)
from kvbench.harness.errors import BudgetError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods.base import Method


def iter_shared_context_cells(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    questions: Sequence[tuple[Sequence[int], int]],
    cells: Sequence[tuple[Method, float]],
    seed: int = 0,
    batch_size: int = 1,
) -> Iterator[tuple[Method, float, list[CellResult] | BudgetError]]:
    """Per cell, the answers to every `(question_ids, max_new_tokens)` after one compression of the context (or
    the cell's BudgetError). Prefill as `iter_cells`: one shared, plus a private one per method that needs it.
    `batch_size` > 1 decodes a cell's questions that many at a time, in one batch."""

    def answer_all(observed: TimedObservation | None, method: Method, budget: float) -> list[CellResult]:
        effective = budget if method.uses_budget else 1.0
        compressed = compress_context(loaded, observed, method, effective, context_ids, seed)
        size, results = max(1, batch_size), []
        for start in range(0, len(questions), size):  # a batch of one row decodes as that row alone
            results += _answer_batch(loaded, method, effective, compressed, questions[start : start + size])
        return results

    return iter_cells(loaded, context_ids, cells, answer_all, seed)


def _answer_batch(
    loaded: LoadedModel,
    method: Method,
    budget: float,
    compressed: CompressedContext,
    questions: Sequence[tuple[Sequence[int], int]],
) -> list[CellResult]:
    """Questions of one compressed context in one decode batch, each row on its own copy of the compressed cache."""
    rows = [
        (method, budget, dataclasses.replace(compressed, cache=copy.deepcopy(compressed.cache)), ids, allowance)
        for ids, allowance in questions
    ]
    return decode_batch(loaded, rows)

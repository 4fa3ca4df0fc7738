"""Cells that score given continuations against a compressed context instead of decoding an answer.

Perplexity and loglikelihood requests follow the same prefill → compress path as generation cells (one shared
prefill per context, every (method, budget) compressed from it), then score each continuation with the cache
cut back to its compressed context, so all continuations of a context see the same compressed cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvbench.harness.engine.continuation import ContinuationScore, score_continuation
from kvbench.harness.engine.measure import peak_memory_bytes, reset_peak_memory, timed
from kvbench.harness.engine.pipeline import PeakBytes, TimedObservation, compress_context, head_spread, iter_cells
from kvbench.harness.errors import BudgetError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods.base import Method


@dataclass
class ScoredCell:
    """One (method, budget) on one context: the scores of its continuations and what they cost."""

    method: str
    budget: float
    scores: list[ContinuationScore]
    kv_bytes: int
    kv_bytes_full: int
    prefill_s: float
    compress_s: float
    score_s: float
    kv_bytes_peak: int = 0
    prefill_peak_memory_bytes: int | None = None
    decode_peak_memory_bytes: int | None = None
    head_spread: dict[str, float] | None = None

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_full


def run_scoring_cell(
    loaded: LoadedModel,
    observed: TimedObservation | None,
    method: Method,
    budget: float,
    question_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    context_ids: Sequence[int] = (),
    seed: int = 0,
) -> ScoredCell:
    """Compress the context with `method` at `budget`, then score every continuation after `question_ids`.

    A method that evicts while decoding changes its compressed context token by token: where it could within
    the question and the longest continuation, each continuation is scored one token at a time with the
    method's decode hooks, from a fresh compression of the context (the recompressions count in `score_s`).
    Otherwise one compressed cache serves them all, each continuation in one pass.
    """
    effective_budget = budget if method.uses_budget else 1.0
    compressed = compress_context(loaded, observed, method, effective_budget, context_ids, seed)
    prefill_peak = compressed.prefill_peak_memory_bytes
    reset_peak_memory(loaded.device)
    kv_bytes = compressed.cache.kv_bytes()
    spread = head_spread(compressed.cache)
    stepwise = method.changes_cache_within(
        compressed.cache, len(question_ids) + max(map(len, continuations), default=0)
    )
    scores = []
    kv_bytes_peak = kv_bytes
    with timed(loaded.device) as watch:
        for index, continuation in enumerate(continuations):
            if index and stepwise:
                compressed = compress_context(loaded, observed, method, effective_budget, context_ids, seed)
            compressed.cache.reset_tail()
            peak = PeakBytes(compressed.cache, method.on_decode_step)
            hooks = dict(start_hook=method.on_decode_start, step_hook=peak.step) if stepwise else {}
            scores.append(
                score_continuation(
                    loaded.model,
                    compressed.cache,
                    continuation,
                    question_ids,
                    first_logits=compressed.last_logits,
                    **hooks,
                )
            )
            kv_bytes_peak = max(kv_bytes_peak, peak.read(compressed.cache))
    return ScoredCell(
        method=method.name,
        budget=effective_budget,
        scores=scores,
        kv_bytes=kv_bytes,
        kv_bytes_full=compressed.kv_bytes_full,
        prefill_s=compressed.prefill_s,
        compress_s=compressed.compress_s,
        score_s=watch.seconds,
        kv_bytes_peak=kv_bytes_peak,
        prefill_peak_memory_bytes=prefill_peak,
        decode_peak_memory_bytes=peak_memory_bytes(loaded.device),
        head_spread=spread,
    )


def iter_scoring_cells(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    cells: Sequence[tuple[Method, float]],
    seed: int = 0,
) -> Iterator[tuple[Method, float, ScoredCell | BudgetError]]:
    """Every (method, budget) scoring the continuations after one context (see `pipeline.iter_cells`)."""

    def scored(observed: TimedObservation | None, method: Method, budget: float) -> ScoredCell:
        return run_scoring_cell(
            loaded, observed, method, budget, question_ids, continuations, context_ids=context_ids, seed=seed
        )

    return iter_cells(loaded, context_ids, cells, scored, seed)

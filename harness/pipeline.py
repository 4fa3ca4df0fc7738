"""Prefill once, compress many: run (method, budget) cells for one context from a shared observation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from kvbench.harness.cache import KVBenchCache
from kvbench.harness.decode import greedy_decode
from kvbench.harness.errors import BudgetError
from kvbench.harness.measure import peak_memory_bytes, reset_peak_memory, timed
from kvbench.harness.models import LoadedModel, head_dim
from kvbench.harness.prefill import Observation, ObservationNeeds, prefill
from kvbench.methods.base import Method

T = TypeVar("T")


@dataclass
class CellResult:
    """One (method, budget) on one context: what it produced and what it cost."""

    method: str
    budget: float
    output: str
    token_ids: list[int]
    new_tokens: int
    stopped_by: str
    kv_bytes: int
    kv_bytes_full: int
    prefill_s: float
    compress_s: float
    decode_s: float
    peak_memory_bytes: int | None = None
    step_logits: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_full


@dataclass
class TimedObservation:
    observation: Observation
    prefill_s: float


def shared_needs(methods: Sequence[Method]) -> ObservationNeeds:
    """The union of what the methods that can share a prefill declared."""
    needs = ObservationNeeds()
    for method in methods:
        if not method.needs().own_prefill:
            needs = needs.union(method.needs())
    return needs


def observe(loaded: LoadedModel, context_ids: Sequence[int], needs: ObservationNeeds) -> TimedObservation:
    with timed(loaded.device) as watch:
        observation = prefill(loaded.model, list(context_ids), needs)
    return TimedObservation(observation, watch.seconds)


def full_kv_bytes(config, context_length: int, dtype: torch.dtype) -> int:
    """Bytes of an uncompressed K and V cache for `context_length` tokens: the budget's denominator."""
    elements = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * context_length
    return elements * torch.empty((), dtype=dtype).element_size()


@dataclass
class CompressedContext:
    """A context in a method's compressed cache, with what it cost to get there."""

    cache: KVBenchCache
    last_logits: torch.Tensor
    kv_bytes_full: int
    prefill_s: float
    compress_s: float


def compress_context(
    loaded: LoadedModel, observed: TimedObservation | None, method: Method, budget: float, context_ids: Sequence[int]
) -> CompressedContext:
    if method.prefills_itself(loaded.model.config, len(context_ids), budget):
        # The method prunes while it prefills: its compression time is inside its prefill.
        with timed(loaded.device) as watch:
            cache, last_logits = method.prefill_and_compress(loaded.model, list(context_ids), budget)
        if any(layer.tail_length for layer in cache.layers):
            raise RuntimeError(f"{method.name} left part of the context uncompressed in the cache tail")
        full = full_kv_bytes(loaded.model.config, len(context_ids), loaded.dtype)
        return CompressedContext(cache, last_logits, full, watch.seconds, 0.0)
    if observed is None:  # a cell run on its own: the method's prefill is a plain one
        observed = observe(loaded, context_ids, method.needs())
    observation = observed.observation
    with timed(loaded.device) as watch:
        prefixes = method.compress(observation, budget)
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    return CompressedContext(
        cache, observation.last_logits, observation.kv_bytes_full(), observed.prefill_s, watch.seconds
    )


def run_cell(
    loaded: LoadedModel,
    observed: TimedObservation | None,
    method: Method,
    budget: float,
    question_ids: Sequence[int],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    keep_logits: bool = False,
    context_ids: Sequence[int] = (),
) -> CellResult:
    """Compress the context with `method` at `budget` (from the shared observation, or through the method's
    own prefill of `context_ids`), then answer greedily against that cache."""
    effective_budget = budget if method.uses_budget else 1.0
    reset_peak_memory(loaded.device)
    compressed = compress_context(loaded, observed, method, effective_budget, context_ids)
    kv_bytes = compressed.cache.kv_bytes()
    with timed(loaded.device) as decode_watch:
        generation = greedy_decode(
            loaded.model,
            compressed.cache,
            list(question_ids),
            max_new_tokens,
            loaded.eos_token_ids,
            tokenizer=loaded.tokenizer,
            stop_strings=stop_strings,
            first_logits=compressed.last_logits,
            step_hook=method.on_decode_step,
            keep_logits=keep_logits,
            start_hook=method.on_decode_start,
        )
    return CellResult(
        method=method.name,
        budget=effective_budget,
        output=generation.text,
        token_ids=generation.token_ids,
        new_tokens=len(generation.token_ids),
        stopped_by=generation.stopped_by,
        kv_bytes=kv_bytes,
        kv_bytes_full=compressed.kv_bytes_full,
        prefill_s=compressed.prefill_s,
        compress_s=compressed.compress_s,
        decode_s=decode_watch.seconds,
        peak_memory_bytes=peak_memory_bytes(loaded.device),
        step_logits=generation.step_logits,
    )


def iter_cells(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    cells: Sequence[tuple[Method, float]],
    run: Callable[[TimedObservation | None, Method, float], T],
) -> Iterator[tuple[Method, float, T | BudgetError]]:
    """Every cell for one context, yielded as each finishes: one shared prefill, plus a private one for each
    method that needs its own; `run(observed, method, budget)` does the cell. A budget a method refuses is
    yielded as its BudgetError, not raised, so a sweep records it and goes on."""
    own = [method.prefills_itself(loaded.model.config, len(context_ids), budget) for method, budget in cells]
    shared = None
    if not all(own):
        shared = observe(loaded, context_ids, shared_needs([m for (m, _), mine in zip(cells, own) if not mine]))
    for (method, budget), mine in zip(cells, own):
        try:
            result = run(None if mine else shared, method, budget)
        except BudgetError as refusal:
            yield method, budget, refusal
            continue
        yield method, budget, result


def iter_context_cells(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    cells: Sequence[tuple[Method, float]],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
) -> Iterator[tuple[Method, float, CellResult | BudgetError]]:
    """Every (method, budget) answering the question after one context (see `iter_cells`)."""

    def answer(observed: TimedObservation | None, method: Method, budget: float) -> CellResult:
        return run_cell(
            loaded, observed, method, budget, question_ids, max_new_tokens, stop_strings, context_ids=context_ids
        )

    return iter_cells(loaded, context_ids, cells, answer)


def run_context(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    cells: Sequence[tuple[Method, float]],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
) -> list[CellResult]:
    """All cells for one context; a refused budget raises its BudgetError."""
    results = []
    for _, _, outcome in iter_context_cells(loaded, context_ids, question_ids, cells, max_new_tokens, stop_strings):
        if isinstance(outcome, BudgetError):
            raise outcome
        results.append(outcome)
    return results

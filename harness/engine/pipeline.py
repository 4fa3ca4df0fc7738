"""Prefill once, compress many: run (method, budget) cells for one context from a shared observation."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.engine.batched_decode import DecodeRow, batched_greedy_decode
from kvbench.harness.engine.decode import Generation, greedy_decode
from kvbench.harness.engine.measure import peak_memory_bytes, reset_peak_memory, timed
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError, Unsupported
from kvbench.harness.models.families import kept_positions
from kvbench.harness.models.loading import LoadedModel, head_dim, kv_heads
from kvbench.harness.token_budget import for_context
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
    kv_bytes_peak: int = 0
    # Bytes held once the answer is written, and (tokens generated, bytes held) over the decode (`PeakBytes`).
    kv_bytes_final: int = 0
    kv_trace: list[list[int]] = field(default_factory=list, repr=False)
    prefill_peak_memory_bytes: int | None = None
    decode_peak_memory_bytes: int | None = None
    head_spread: dict[str, float] | None = None
    # The rows its decode batch started with (1: decoded alone); decode_s is then its share of the batch's time.
    decode_batch: int = 1
    step_logits: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_full


@dataclass
class TimedObservation:
    observation: Observation
    prefill_s: float
    # Device memory peak of the prefill (None where torch does not track it, e.g. on CPU).
    peak_memory_bytes: int | None = None


def shared_needs(methods: Sequence[Method]) -> ObservationNeeds:
    """The union of what the methods that can share a prefill declared."""
    needs = ObservationNeeds()
    for method in methods:
        if not method.needs().own_prefill:
            needs = needs.union(method.needs())
    return needs


def observe(
    loaded: LoadedModel, context_ids: Sequence[int], needs: ObservationNeeds, seed: int = 0
) -> TimedObservation:
    """The shared prefill, timed, with its device memory peak; `seed` is what methods that draw random numbers
    derive their generators from (the harness derives it from the run seed and the sample)."""
    reset_peak_memory(loaded.device)
    with timed(loaded.device) as watch:
        observation = prefill(loaded.model, list(context_ids), needs)
    observation.seed = seed
    return TimedObservation(observation, watch.seconds, peak_memory_bytes(loaded.device))


def full_kv_bytes(config, context_length: int, dtype: torch.dtype) -> int:
    """Bytes of an uncompressed K and V cache for `context_length` tokens as a plain transformers cache holds it
    (sliding-window layers at their window): the budget's denominator."""
    positions = sum(kept_positions(config, context_length))
    elements = 2 * kv_heads(config) * head_dim(config) * positions
    return elements * torch.empty((), dtype=dtype).element_size()


def head_spread(cache: KVBenchCache) -> dict[str, float] | None:
    """How unevenly the compressed context is spread over KV heads, right after compression: min, median and
    max over every (layer, head) of n_h / mean_h(n_h), the mean taken within the head's layer (1/1/1 when every
    head of a layer holds as many positions). Measured from the stored prefixes' head lengths, whatever the
    method says of its budgets; None for a cache with no prefix."""
    ratios: list[float] = []
    for layer in cache.layers:
        if layer.prefix is None:
            continue
        lengths = layer.prefix.head_lengths()
        mean = sum(lengths) / len(lengths)
        ratios.extend(n / mean if mean else 1.0 for n in lengths)
    if not ratios:
        return None
    return {"min": round(min(ratios), 4), "median": round(statistics.median(ratios), 4), "max": round(max(ratios), 4)}


@dataclass
class CompressedContext:
    """A context in a method's compressed cache, with what it cost to get there."""

    cache: KVBenchCache
    last_logits: torch.Tensor
    kv_bytes_full: int
    prefill_s: float
    compress_s: float
    # Device memory peak of the prefill this context came from: the shared one, or the method's own.
    prefill_peak_memory_bytes: int | None = None


def compress_context(
    loaded: LoadedModel,
    observed: TimedObservation | None,
    method: Method,
    budget: float,
    context_ids: Sequence[int],
    seed: int = 0,
) -> CompressedContext:
    budget = for_context(budget, len(context_ids))  # a token budget: the fraction of this context it allows
    if method.prefills_itself(loaded.model.config, len(context_ids), budget):
        if min(kept_positions(loaded.model.config, len(context_ids))) < len(context_ids):
            raise Unsupported(
                f"{method.label} compresses while it prefills and cannot keep this model's sliding windows yet"
            )
        # The method prunes while it prefills: its compression time is inside its prefill.
        reset_peak_memory(loaded.device)
        with timed(loaded.device) as watch:
            cache, last_logits = method.prefill_and_compress(loaded.model, list(context_ids), budget)
        if any(layer.tail_length for layer in cache.layers):
            raise RuntimeError(f"{method.name} left part of the context uncompressed in the cache tail")
        full = full_kv_bytes(loaded.model.config, len(context_ids), loaded.dtype)
        return CompressedContext(cache, last_logits, full, watch.seconds, 0.0, peak_memory_bytes(loaded.device))
    if observed is None:  # a cell run on its own: the method's prefill is a plain one
        observed = observe(loaded, context_ids, method.needs(), seed)
    observation = observed.observation
    with timed(loaded.device) as watch:
        prefixes = method.compress(observation, budget)
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    return CompressedContext(
        cache,
        observation.last_logits,
        observation.kv_bytes_full(),
        observed.prefill_s,
        watch.seconds,
        observed.peak_memory_bytes,
    )


# Points of a row's `kv_trace` (held bytes against generated tokens), at most: a long answer is thinned evenly.
TRACE_POINTS = 64


class PeakBytes:
    """The most bytes a cache held over a decode (`KVBenchCache.held_bytes`: compressed prefix, method state and
    the raw tail), read after the compression and after every decode step, once its hook has run; with the bytes
    held at the end (`final`) and after each step (`trace`, as (tokens generated, bytes held))."""

    def __init__(self, cache: KVBenchCache, step_hook=None):
        self.peak = cache.held_bytes()
        self._step_hook = step_hook
        self.held: list[tuple[int, int]] = [(0, self.peak)]
        self.final = self.peak

    def step(self, cache: KVBenchCache, step: int) -> None:
        if self._step_hook is not None:
            self._step_hook(cache, step)
        held = cache.held_bytes()
        self.peak = max(self.peak, held)
        self.held.append((step + 1, held))

    def read(self, cache: KVBenchCache) -> int:
        self.final = cache.held_bytes()
        self.peak = max(self.peak, self.final)
        return self.peak

    def trace(self) -> list[list[int]]:
        """At most TRACE_POINTS of (tokens generated, bytes held), evenly spaced, the first and last included."""
        points = self.held
        if len(points) > TRACE_POINTS:
            last = len(points) - 1
            points = [points[round(i * last / (TRACE_POINTS - 1))] for i in range(TRACE_POINTS)]
        return [list(point) for point in points]


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
    seed: int = 0,
) -> CellResult:
    """Compress the context with `method` at `budget` (from the shared observation, or through the method's
    own prefill of `context_ids`), then answer greedily against that cache.

    Memory: `kv_bytes` is what the cache holds right after compression, `kv_bytes_peak` the most it held while
    the question and answer were fed. Device memory: `prefill_peak_memory_bytes` is the peak of the prefill
    this context came from (the shared one, or the method's own with the compression inside it) and
    `decode_peak_memory_bytes` the peak while the question and answer were decoded, both read the same way
    whichever prefill it was (None on CPU, where torch does not track it)."""
    effective_budget = budget if method.uses_budget else 1.0
    compressed = compress_context(loaded, observed, method, effective_budget, context_ids, seed)
    reset_peak_memory(loaded.device)
    kv_bytes = compressed.cache.kv_bytes()
    spread = head_spread(compressed.cache)
    peak = PeakBytes(compressed.cache, method.on_decode_step)
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
            step_hook=peak.step,
            keep_logits=keep_logits,
            start_hook=method.on_decode_start,
        )
    return _cell_result(
        method,
        effective_budget,
        compressed,
        generation,
        kv_bytes,
        spread,
        decode_watch.seconds,
        peak.read(compressed.cache),
        peak_memory_bytes(loaded.device),
        peak=peak,
    )


def _cell_result(
    method: Method,
    budget: float,
    compressed: CompressedContext,
    generation: Generation,
    kv_bytes: int,
    spread: dict[str, float] | None,
    decode_s: float,
    kv_bytes_peak: int,
    decode_peak_memory_bytes: int | None,
    decode_batch: int = 1,
    peak: PeakBytes | None = None,
) -> CellResult:
    return CellResult(
        method=method.name,
        budget=budget,
        output=generation.text,
        token_ids=generation.token_ids,
        new_tokens=len(generation.token_ids),
        stopped_by=generation.stopped_by,
        kv_bytes=kv_bytes,
        kv_bytes_full=compressed.kv_bytes_full,
        prefill_s=compressed.prefill_s,
        compress_s=compressed.compress_s,
        decode_s=decode_s,
        kv_bytes_peak=kv_bytes_peak,
        kv_bytes_final=peak.final if peak is not None else 0,
        kv_trace=peak.trace() if peak is not None else [],
        prefill_peak_memory_bytes=compressed.prefill_peak_memory_bytes,
        decode_peak_memory_bytes=decode_peak_memory_bytes,
        head_spread=spread,
        decode_batch=decode_batch,
        step_logits=generation.step_logits,
    )


def _prefill_plan(
    loaded: LoadedModel, context_ids: Sequence[int], cells: Sequence[tuple[Method, float]], seed: int
) -> tuple[list[bool | BudgetError], TimedObservation | None]:
    """Per cell whether it needs its own prefill (or the BudgetError of a refused budget), and the shared prefill
    of the others (None when no cell shares it)."""
    own: list[bool | BudgetError] = []
    for method, budget in cells:
        try:
            own.append(
                method.prefills_itself(loaded.model.config, len(context_ids), for_context(budget, len(context_ids)))
            )
        except BudgetError as refusal:
            own.append(refusal)
    shared = None
    sharing = [m for (m, _), mine in zip(cells, own) if mine is False]
    if sharing:
        shared = observe(loaded, context_ids, shared_needs(sharing), seed)
    return own, shared


def iter_cells(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    cells: Sequence[tuple[Method, float]],
    run: Callable[[TimedObservation | None, Method, float], T],
    seed: int = 0,
) -> Iterator[tuple[Method, float, T | BudgetError]]:
    """Every cell for one context, yielded as each finishes: one shared prefill, plus a private one for each
    method that needs its own; `run(observed, method, budget)` does the cell. A budget a method refuses (even
    when deciding which prefill it needs) is yielded as its BudgetError, not raised, so a sweep records it and
    goes on."""
    own, shared = _prefill_plan(loaded, context_ids, cells, seed)
    for (method, budget), mine in zip(cells, own):
        if isinstance(mine, BudgetError):
            yield method, budget, mine
            continue
        try:
            result = run(None if mine else shared, method, budget)
        except BudgetError as refusal:
            yield method, budget, refusal
            continue
        yield method, budget, result


def run_batch(
    loaded: LoadedModel,
    compressed: Sequence[tuple[Method, float, CompressedContext]],
    question_ids: Sequence[int],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    keep_logits: bool = False,
) -> list[CellResult]:
    """Answer the question after each compressed context, all of them in one decode batch (`batched_greedy_decode`):
    each row's tokens, bytes and score are those `run_cell` gives it alone. Per row, `kv_bytes`, `kv_bytes_peak`
    and `head_spread` are its own cache's; `decode_s` its share of the batch's time (see `RowDecode`) and
    `decode_batch` the batch's size; `decode_peak_memory_bytes` is the batch's device peak, shared by its rows."""
    rows = [(method, budget, entry, question_ids, max_new_tokens) for method, budget, entry in compressed]
    return decode_batch(loaded, rows, stop_strings, keep_logits)


def decode_batch(
    loaded: LoadedModel,
    rows: Sequence[tuple[Method, float, CompressedContext, Sequence[int], int]],
    stop_strings: Sequence[str] = (),
    keep_logits: bool = False,
) -> list[CellResult]:
    """`run_batch` with a question and an allowance of its own per row: (method, budget, compressed context,
    question ids, max new tokens) each, every row decoding on its entry's cache."""
    kv_bytes = [entry.cache.kv_bytes() for _, _, entry, _, _ in rows]
    spreads = [head_spread(entry.cache) for _, _, entry, _, _ in rows]
    peaks = [PeakBytes(entry.cache, method.on_decode_step) for method, _, entry, _, _ in rows]
    decode_rows = [
        DecodeRow(
            entry.cache,
            list(question_ids),
            max_new_tokens,
            first_logits=entry.last_logits,
            stop_strings=stop_strings,
            step_hook=peak.step,
            start_hook=method.on_decode_start,
        )
        for (method, _, entry, question_ids, max_new_tokens), peak in zip(rows, peaks)
    ]
    reset_peak_memory(loaded.device)
    decoded = batched_greedy_decode(loaded.model, decode_rows, loaded.eos_token_ids, loaded.tokenizer, keep_logits)
    device_peak = peak_memory_bytes(loaded.device)
    return [
        _cell_result(
            method,
            budget,
            entry,
            row.generation,
            kv,
            spread,
            row.decode_s,
            peak.read(entry.cache),
            device_peak,
            row.batch,
            peak=peak,
        )
        for (method, budget, entry, _, _), row, kv, spread, peak in zip(rows, decoded, kv_bytes, spreads, peaks)
    ]


def iter_context_cells(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    cells: Sequence[tuple[Method, float]],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    seed: int = 0,
    batch_size: int = 1,
) -> Iterator[tuple[Method, float, CellResult | BudgetError]]:
    """Every (method, budget) answering the question after one context (see `iter_cells`). With `batch_size` > 1
    the cells decode `batch_size` at a time in one batch (`run_batch`), cells with their own prefill among them,
    each batch's cells yielded when it finishes; 1 decodes each cell alone (`run_cell`), the reference path."""
    if batch_size > 1:
        return _iter_batched_cells(
            loaded, context_ids, question_ids, cells, max_new_tokens, stop_strings, seed, batch_size
        )

    def answer(observed: TimedObservation | None, method: Method, budget: float) -> CellResult:
        return run_cell(
            loaded,
            observed,
            method,
            budget,
            question_ids,
            max_new_tokens,
            stop_strings,
            context_ids=context_ids,
            seed=seed,
        )

    return iter_cells(loaded, context_ids, cells, answer, seed)


def _iter_batched_cells(
    loaded: LoadedModel,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    cells: Sequence[tuple[Method, float]],
    max_new_tokens: int,
    stop_strings: Sequence[str],
    seed: int,
    batch_size: int,
) -> Iterator[tuple[Method, float, CellResult | BudgetError]]:
    own, shared = _prefill_plan(loaded, context_ids, cells, seed)
    pending: list[tuple[Method, float, float, CompressedContext]] = []

    def decode_pending() -> list[tuple[Method, float, CellResult]]:
        results = run_batch(
            loaded, [(m, effective, c) for m, _, effective, c in pending], question_ids, max_new_tokens, stop_strings
        )
        done = [(m, budget, result) for (m, budget, _, _), result in zip(pending, results)]
        pending.clear()
        return done

    for (method, budget), mine in zip(cells, own):
        if isinstance(mine, BudgetError):
            yield method, budget, mine
            continue
        effective = budget if method.uses_budget else 1.0
        try:
            compressed = compress_context(loaded, None if mine else shared, method, effective, context_ids, seed)
        except BudgetError as refusal:
            yield method, budget, refusal
            continue
        pending.append((method, budget, effective, compressed))
        if len(pending) == batch_size:
            yield from decode_pending()
    if pending:
        yield from decode_pending()


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

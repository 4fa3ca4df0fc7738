"""Greedy decoding of several compressed caches in one batch: one forward pass per generated token for all rows.

Each row is what `greedy_decode` takes for one sequence (its own `KVBenchCache`, question, limits, hooks) and
decodes by exactly its rules: the same steps in the same order, its hooks called on its own cache after each of
its forward passes. Only the forward passes are shared: the rows' tokens go through the model as one batch (the
projections and the MLP read their weights once for all rows) and attention attends each row over its own
compressed prefix and tail (`BatchedCache`). A row that stops (EOS, a stop string, its token limit) leaves the
batch; the others go on as before, so a row's tokens do not depend on which rows it was batched with.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvbench.harness.cache.attention import kvbench_attention_enabled
from kvbench.harness.cache.batched import BatchedCache
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument
from kvbench.harness.engine.decode import Generation, StartHook, StepHook, next_token_logits


@dataclass
class DecodeRow:
    """One sequence of a decode batch: what `greedy_decode` takes for it."""

    cache: KVBenchCache
    question_ids: Sequence[int]
    max_new_tokens: int
    first_logits: torch.Tensor | None = None
    stop_strings: Sequence[str] = ()
    step_hook: StepHook | None = None
    start_hook: StartHook | None = None


@dataclass
class RowDecode:
    """A row's generation and its share of the batch's decode time.

    `decode_s`: for every forward pass the row was in, that pass's wall time divided by the rows in it, plus the
    time of the row's own token choices and hooks. The rows' shares add up to the batch's wall time, so tokens
    per second summed over rows are the batch's; a row alone in its batch gets its whole wall time, as unbatched.
    `batch`: the rows the batch started with.
    """

    generation: Generation
    decode_s: float
    batch: int


@dataclass
class _Row:
    spec: DecodeRow
    logits: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    stopped_by: str = "max_new_tokens"
    seconds: float = 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    _synchronize(device)
    return time.perf_counter()


def batch_logits(model: torch.nn.Module, caches: list[KVBenchCache], ids: list[Sequence[int]]) -> torch.Tensor:
    """Feed ids[b] after everything in caches[b], for every row at once; [B, vocab] last-position logits.

    The rows must feed as many tokens each; each continues at its own cache's length. One row takes the unbatched
    path itself (`next_token_logits`)."""
    if len(caches) == 1:
        return next_token_logits(model, caches[0], ids[0])[None]
    device = model.device
    starts = [cache.get_seq_length() for cache in caches]
    length = len(ids[0])
    batch = BatchedCache(caches)
    out = model(
        input_ids=torch.tensor([list(row) for row in ids], dtype=torch.long, device=device),
        position_ids=torch.tensor([[s + j for j in range(length)] for s in starts], device=device),
        **cache_argument(model, batch),
        use_cache=True,
        logits_to_keep=1,
        kvbench_cache=batch,
    )
    return out.logits[:, -1]


def _shared_forward(model: torch.nn.Module, rows: list[_Row], ids: list[Sequence[int]]) -> None:
    """One forward pass for `rows`, its wall time shared equally among them."""
    start = _clock(model.device)
    logits = batch_logits(model, [row.spec.cache for row in rows], ids)
    share = (_clock(model.device) - start) / len(rows)
    for row, row_logits in zip(rows, logits):
        row.logits = row_logits
        row.seconds += share


def _choose(row: _Row, step: int, eos: set[int], tokenizer, keep_logits: bool) -> bool:
    """`greedy_decode`'s step for one row: keep its logits, take the argmax; False once the row has stopped."""
    if keep_logits:
        row.kept.append(row.logits.float().cpu())
    token = int(torch.argmax(row.logits))
    row.tokens.append(token)
    if token in eos:
        row.stopped_by = "eos"
        return False
    stops = row.spec.stop_strings
    if stops and any(s in tokenizer.decode(row.tokens, skip_special_tokens=True) for s in stops):
        row.stopped_by = "stop_string"
        return False
    return step + 1 < row.spec.max_new_tokens


def _generation(row: _Row, tokenizer) -> Generation:
    text = tokenizer.decode(row.tokens, skip_special_tokens=True) if tokenizer is not None else ""
    for stop in row.spec.stop_strings:
        if stop in text:
            text = text[: text.index(stop)]
    return Generation(row.tokens, text, row.stopped_by, row.kept)


@torch.inference_mode()
def batched_greedy_decode(
    model: torch.nn.Module,
    specs: Sequence[DecodeRow],
    eos_token_ids: Sequence[int],
    tokenizer=None,
    keep_logits: bool = False,
) -> list[RowDecode]:
    """Decode every row greedily, as `greedy_decode` would alone, with one forward pass per step for all rows
    still going. Rows feeding questions of equal length feed them in one pass (rows of one sample share theirs)."""
    for spec in specs:
        if not spec.question_ids and spec.first_logits is None:
            raise ValueError("nothing to decode from: give question tokens or the prefill's last logits")
        if spec.stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer")
    if len({id(spec.cache) for spec in specs}) != len(specs):
        raise ValueError("every row of a batch decodes its own cache")
    eos = set(int(t) for t in eos_token_ids)
    device = model.device
    rows = [_Row(spec) for spec in specs]
    for row in rows:
        if hasattr(row.spec.cache, "reserve"):  # the tail's room for the whole decode, allocated once
            row.spec.cache.reserve(len(row.spec.question_ids) + row.spec.max_new_tokens)
        if row.spec.start_hook is not None:
            start = _clock(device)
            row.spec.start_hook(row.spec.cache)
            row.seconds += _clock(device) - start
    with kvbench_attention_enabled(model):
        by_length: dict[int, list[_Row]] = {}
        for row in rows:
            if row.spec.question_ids:
                by_length.setdefault(len(row.spec.question_ids), []).append(row)
            else:
                row.logits = row.spec.first_logits
        for group in by_length.values():
            _shared_forward(model, group, [row.spec.question_ids for row in group])
        live = [row for row in rows if row.spec.max_new_tokens > 0]
        step = 0
        while live:
            going = []
            for row in live:
                start = _clock(device)
                if _choose(row, step, eos, tokenizer, keep_logits):
                    going.append(row)
                row.seconds += _clock(device) - start
            if not going:
                break
            _shared_forward(model, going, [[row.tokens[-1]] for row in going])
            for row in going:
                if row.spec.step_hook is not None:
                    start = _clock(device)
                    row.spec.step_hook(row.spec.cache, step)
                    row.seconds += _clock(device) - start
            live = going
            step += 1
    return [RowDecode(_generation(row, tokenizer), row.seconds, len(rows)) for row in rows]

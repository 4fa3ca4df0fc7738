"""Greedy decoding against a compressed cache, with explicit positions after the original context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvbench.harness.cache.attention import kvbench_attention_enabled
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument

# Called after every generated token's forward pass: (cache, step index). Decode-time methods evict here.
StepHook = Callable[[KVBenchCache, int], None]
# Called once before the first forward after the context: decode-time methods attach their state here.
StartHook = Callable[[KVBenchCache], None]


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    stopped_by: str  # "eos", "stop_string" or "max_new_tokens"
    step_logits: list[torch.Tensor] = field(default_factory=list, repr=False)


def next_token_logits(model: torch.nn.Module, cache: KVBenchCache, ids: Sequence[int]) -> torch.Tensor:
    """Feed `ids` after everything in the cache (positions continue from its length); the last position's logits."""
    start = cache.get_seq_length()
    device = model.device
    out = model(
        input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device),
        position_ids=torch.arange(start, start + len(ids), device=device)[None],
        **cache_argument(model, cache),
        use_cache=True,
        logits_to_keep=1,
        kvbench_cache=cache,
    )
    return out.logits[0, -1]


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module,
    cache: KVBenchCache,
    question_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    tokenizer=None,
    stop_strings: Sequence[str] = (),
    first_logits: torch.Tensor | None = None,
    step_hook: StepHook | None = None,
    keep_logits: bool = False,
    start_hook: StartHook | None = None,
) -> Generation:
    """Feed the question after the compressed context, then pick argmax tokens until EOS, a stop string or the limit.

    `first_logits` are the prefill's next-token logits, used when no question tokens follow the context.
    Text is decoded with special tokens skipped and cut before the first stop string.
    """
    if not question_ids and first_logits is None:
        raise ValueError("nothing to decode from: give question tokens or the prefill's last logits")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    eos = set(int(t) for t in eos_token_ids)
    if hasattr(cache, "reserve"):  # the tail's room for the whole decode, allocated once
        cache.reserve(len(question_ids) + max_new_tokens)
    if start_hook is not None:
        start_hook(cache)
    with kvbench_attention_enabled(model):
        logits = next_token_logits(model, cache, question_ids) if question_ids else first_logits
        tokens: list[int] = []
        kept_logits: list[torch.Tensor] = []
        stopped_by = "max_new_tokens"
        for step in range(max_new_tokens):
            if keep_logits:
                kept_logits.append(logits.float().cpu())
            token = int(torch.argmax(logits))
            tokens.append(token)
            if token in eos:
                stopped_by = "eos"
                break
            if stop_strings and any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop_strings):
                stopped_by = "stop_string"
                break
            if step + 1 == max_new_tokens:
                break
            logits = next_token_logits(model, cache, [token])
            if step_hook is not None:
                step_hook(cache, step)
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
    for stop in stop_strings:
        if stop in text:
            text = text[: text.index(stop)]
    return Generation(tokens, text, stopped_by, kept_logits)

"""Teacher-forced scoring of given tokens against a compressed cache: the loglikelihood counterpart of decoding.

Generation quality hides how much a compressed context still predicts; the log-probability of a known
continuation (perplexity, lm-eval's loglikelihood requests) measures it directly, with no sampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvbench.harness.cache.attention import kvbench_attention_enabled
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument
from kvbench.harness.engine.decode import StartHook, StepHook, next_token_logits


@dataclass(frozen=True)
class ContinuationScore:
    """Per-token log-probabilities of a continuation, and whether greedy decoding would have produced it."""

    logprobs: list[float]
    greedy: bool

    @property
    def total(self) -> float:
        return sum(self.logprobs)

    @property
    def perplexity(self) -> float:
        return perplexity(self.logprobs)


def perplexity(logprobs: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood per token."""
    if not logprobs:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(-sum(logprobs) / len(logprobs))


@torch.inference_mode()
def score_continuation(
    model: torch.nn.Module,
    cache: KVBenchCache,
    continuation_ids: Sequence[int],
    question_ids: Sequence[int] = (),
    first_logits: torch.Tensor | None = None,
    start_hook: StartHook | None = None,
    step_hook: StepHook | None = None,
) -> ContinuationScore:
    """Feed the question and the continuation (but its last token) after the cache, and read each
    continuation token's log-probability from the logits before it.

    `first_logits` are the prefill's next-token logits: they score the first continuation token when no
    question follows the context. Positions continue after the cache (the original context length), as in
    `greedy_decode`, so with `full` this equals a plain forward pass over context + continuation. Without a
    `step_hook` the tokens go in one pass; with one (a method that evicts while decoding) they go one at a
    time with the hooks called exactly as `greedy_decode` calls them, so the cache each token sees is the one
    it would see had the method generated the continuation itself.
    """
    if not continuation_ids:
        raise ValueError("nothing to score: the continuation is empty")
    if not question_ids and first_logits is None:
        raise ValueError("give question tokens or the prefill's last logits to score the first token")
    if step_hook is not None:
        logits = _stepwise_logits(model, cache, continuation_ids, question_ids, first_logits, start_hook, step_hook)
    else:
        logits = _one_pass_logits(model, cache, continuation_ids, question_ids, first_logits)
    targets = torch.tensor(list(continuation_ids), dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    greedy = bool((logits.argmax(dim=-1) == targets).all())
    return ContinuationScore([float(value) for value in logprobs.cpu()], greedy)


def _one_pass_logits(
    model: torch.nn.Module,
    cache: KVBenchCache,
    continuation_ids: Sequence[int],
    question_ids: Sequence[int],
    first_logits: torch.Tensor | None,
) -> torch.Tensor:
    fed = [*question_ids, *continuation_ids[:-1]]
    start = cache.get_seq_length()
    device = model.device
    rows = []
    if not question_ids:
        rows.append(first_logits.reshape(1, -1))
    if fed:
        with kvbench_attention_enabled(model):
            out = model(
                input_ids=torch.tensor([fed], dtype=torch.long, device=device),
                position_ids=torch.arange(start, start + len(fed), device=device)[None],
                **cache_argument(model, cache),
                use_cache=True,
                logits_to_keep=len(continuation_ids) - (0 if question_ids else 1),
                kvbench_cache=cache,
            )
        rows.append(out.logits[0])
    return torch.cat(rows).float()


def _stepwise_logits(
    model: torch.nn.Module,
    cache: KVBenchCache,
    continuation_ids: Sequence[int],
    question_ids: Sequence[int],
    first_logits: torch.Tensor | None,
    start_hook: StartHook | None,
    step_hook: StepHook,
) -> torch.Tensor:
    if start_hook is not None:
        start_hook(cache)
    with kvbench_attention_enabled(model):
        rows = [next_token_logits(model, cache, question_ids) if question_ids else first_logits.reshape(-1)]
        for step, token in enumerate(continuation_ids[:-1]):
            rows.append(next_token_logits(model, cache, [token]))
            step_hook(cache, step)
    return torch.stack(rows).float()

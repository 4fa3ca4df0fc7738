"""Long-text perplexity: prefill and compress the first N tokens of a text, score the next M against that cache.

Perplexity needs no generation and no scorer model, so it is the cheapest sign that a compressed cache lost
what the model needs to predict the text that follows. The text is essay prose from a drawn offset (the corpus
wraps around). The context is placed where every task's context goes (after the chat template's opening, or
BOS without a template), so the standard fitter sizes it; the continuation is the largest whole-word stretch of
at most `max_new_tokens` tokens and is scored token by token, never generated.
"""

from __future__ import annotations

from random import Random
from typing import Any

from kvbench.tasks.generated.fitting import Draft, Setup, UnitPlan
from kvbench.tasks.generated.haystacks import essay_words
from kvbench.tasks.prompting import split_prompt
from kvbench.tasks.sample import Sample

CONTINUATION_TOKENS = 256


def _words(start: int, count: int) -> list[str]:
    words = essay_words()
    return [words[(start + i) % len(words)] for i in range(count)]


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """The scored tokens of a continuation: its own tokens, no special tokens (it follows the context)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _continuation(tokenizer: Any, start: int, max_tokens: int) -> str:
    """The longest run of whole words from `start` (with its leading space) that fits `max_tokens` tokens."""
    low, high = 1, max_tokens
    while low < high:
        middle = (low + high + 1) // 2
        if len(continuation_ids(tokenizer, " " + " ".join(_words(start, middle)))) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return " " + " ".join(_words(start, low))


def token_split(tokenizer: Any, sample: Sample) -> tuple[list[int], list[int]]:
    """(context ids to prefill and compress, continuation ids to score) for a perplexity sample."""
    parts = split_prompt(tokenizer, sample.context, "", "")
    return parts.context_ids, continuation_ids(tokenizer, sample.references[0])


def plan(setup: Setup) -> UnitPlan:
    """`units` words of context from a drawn offset; grows by 100 words (500 from 4K tokens on)."""

    def render(rng: Random, units: int) -> Draft:
        start = rng.randrange(len(essay_words()))
        continuation = _continuation(setup.tokenizer, start + units, setup.max_new_tokens)
        return Draft(
            context=" ".join(_words(start, units)),
            question="",
            answer_prefix="",
            references=[continuation],
            metadata={"text_offset": start},
        )

    return UnitPlan(render=render, increment=100 if setup.length < 4096 else 500)

"""Frequent words extraction (tasks.md §7): Zipf-distributed coded words, name the top three."""

from __future__ import annotations

import math
import string
from random import Random

from kvbench.tasks.errors import TaskError
from kvbench.tasks.generated.fitting import Draft, Setup, UnitPlan
from kvbench.tasks.generated.templates import fill_template

TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most"
    " frequently appeared coded words. {context}\nQuestion: Do not provide any explanation."
    " Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
ALPHA = 2.0
ZETA_ALPHA = math.pi**2 / 6  # ζ(2), the normaliser of the Zipf weights k^-2
WORD_LENGTH = 6
NOISE_WORD = "..."
MIN_VOCABULARY = 4  # the dots plus the three answer words


def vocabulary(rng: Random, size: int) -> list[str]:
    """`size` distinct random 6-letter words, sorted then shuffled; rank 1 becomes the dots."""
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LENGTH)))
    ordered = sorted(words)
    rng.shuffle(ordered)
    ordered[0] = NOISE_WORD
    return ordered


def counts(total: int, size: int) -> list[int]:
    """Occurrences of the word of rank k: int(total · k^-α / ζ(α))."""
    return [int(total * rank**-ALPHA / ZETA_ALPHA) for rank in range(1, size + 1)]


def render(size: int, rng: Random, units: int) -> Draft:
    """A coded text of about `units` words drawn from a vocabulary of `size`."""
    words = vocabulary(rng, size)
    occurrences = [word for word, count in zip(words, counts(units, size)) for _ in range(count)]
    rng.shuffle(occurrences)
    context, question = fill_template(TEMPLATE, " ".join(occurrences))
    return Draft(
        context=context,
        question=question,
        answer_prefix=ANSWER_PREFIX,
        references=words[1:4],
        metadata={"vocabulary_size": size},
    )


def plan(setup: Setup) -> UnitPlan:
    """RULER's linear search: start at L'/6 words and step by L'/32, with L' = length - max_new_tokens."""
    budget = setup.length - setup.max_new_tokens
    size = budget // 50
    if size < MIN_VOCABULARY:
        raise TaskError(
            f"{setup.task}: length {setup.length} is too small; it needs at least"
            f" {50 * MIN_VOCABULARY + setup.max_new_tokens} tokens"
        )
    return UnitPlan(
        render=lambda rng, units: render(size, rng, units),
        increment=budget // 32,
        linear_start=budget // 6,
    )

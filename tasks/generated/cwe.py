"""Common words extraction (tasks.md §6): name the 10 words repeated most in a long list."""

from __future__ import annotations

from dataclasses import dataclass
from random import Random

from kvbench.tasks.generated.fitting import Draft, Setup, UnitPlan
from kvbench.tasks.generated.templates import fill_template
from kvbench.tasks.generated.words import cwe_words

TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others."
    " Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
NUM_COMMON = 10
INCREMENT = 10


@dataclass(frozen=True)
class Mix:
    """E(n, r_c, r_u): n distinct words, the first 10 repeated r_c times, the others r_u times."""

    common_repeats: int
    other_repeats: int


@dataclass(frozen=True)
class Shape:
    """Few-shot size and the two mixes; RULER uses sparser lists below 4K tokens."""

    example_words: int
    example_mix: Mix
    main_mix: Mix


def shape(length: int) -> Shape:
    """E(40, 10, 3) + E(n, 30, 3) from 4K tokens, E(20, 3, 1) + E(n, 6, 1) below."""
    if length >= 4096:
        return Shape(40, Mix(10, 3), Mix(30, 3))
    return Shape(20, Mix(3, 1), Mix(6, 1))


def numbered(words: list[str]) -> str:
    """`1. w 2. w ...`, space-separated."""
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, 1))


def word_list(rng: Random, words: list[str], mix: Mix) -> str:
    """The shuffled, numbered list for one example; its first NUM_COMMON words are the answer."""
    common, others = words[:NUM_COMMON], words[NUM_COMMON:]
    occurrences = common * mix.common_repeats + others * mix.other_repeats
    rng.shuffle(occurrences)
    return numbered(occurrences)


def render(pool: tuple[str, ...], layout: Shape, rng: Random, units: int) -> Draft:
    """A solved few-shot example, then a list of `units` distinct words (disjoint from the example's)."""
    example_words = rng.sample(pool, layout.example_words)
    taken = set(example_words)
    main_words = rng.sample([word for word in pool if word not in taken], units)
    shot_context, shot_question = fill_template(TEMPLATE, word_list(rng, example_words, layout.example_mix))
    shot = shot_context + shot_question + ANSWER_PREFIX + " " + numbered(example_words[:NUM_COMMON])
    context, question = fill_template(TEMPLATE, word_list(rng, main_words, layout.main_mix))
    return Draft(
        context=shot + "\n" + context,
        question=question,
        answer_prefix=ANSWER_PREFIX,
        references=main_words[:NUM_COMMON],
    )


def plan(setup: Setup) -> UnitPlan:
    """Grow by 10 words; the wonderwords pool (8,166 words) caps n.

    RULER falls back to a Git-LFS word list past the pool; kvbench stops with an error instead.
    """
    pool = cwe_words(setup.seed)
    layout = shape(setup.length)
    return UnitPlan(
        render=lambda rng, units: render(pool, layout, rng, units),
        increment=INCREMENT,
        min_units=NUM_COMMON,
        upper_factor=2.0,
        max_units=len(pool) - layout.example_words,
    )

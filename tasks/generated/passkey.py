"""Passkey retrieval (Landmark attention, arXiv 2305.16300; tasks.md §9)."""

from __future__ import annotations

from random import Random

from kvbench.tasks.generated.fitting import Draft, Setup, UnitPlan
from kvbench.tasks.generated.haystacks import NOISE_SENTENCE

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them."
    " I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = " The pass key is"
DEPTHS = tuple(i / 10 for i in range(11))
DIGITS = 5


def render(rng: Random, units: int) -> Draft:
    """`units` noise sentences with the key line after round(depth · units) of them."""
    key = str(rng.randint(10 ** (DIGITS - 1), 10**DIGITS - 1))
    depth = rng.choice(DEPTHS)
    before = round(depth * units)
    lines = [
        TASK,
        " ".join([NOISE_SENTENCE] * before),
        NEEDLE.format(key=key),
        " ".join([NOISE_SENTENCE] * (units - before)),
    ]
    return Draft(
        context="\n".join(lines) + "\n",
        question=QUESTION,
        answer_prefix=ANSWER_PREFIX,
        references=[key],
        metadata={"depths": [round(100 * depth, 2)]},
    )


def plan(setup: Setup) -> UnitPlan:
    """Grow by 25 noise sentences (5 below 4K tokens), like the NIAH noise haystack."""
    return UnitPlan(render=render, increment=5 if setup.length < 4096 else 25)

"""Fitting a generated prompt to a token budget with the target model's tokenizer (tasks.md §8).

Tokenization is not additive, so every candidate is rendered in full (chat template and
answer prefix included, split exactly as the harness will split it) and measured. The
budget includes the generation allowance: len(context_ids) + len(question_ids) +
max_new_tokens <= length.

One search per (task, length) on a probe sample gives the starting n; each sample then steps
by whole increments from there and bisects the last increment, so every sample fits and would
not fit with one more unit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

from kvbench.tasks.errors import TaskError
from kvbench.tasks.prompting import split_prompt


@dataclass(frozen=True)
class Draft:
    """A generated sample before it is measured: prompt pieces, references, task-specific facts."""

    context: str
    question: str
    answer_prefix: str
    references: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    # The whole expected answer, for tasks whose answer grows with the sample (the arithmetic chain): its generation
    # allowance is then measured from it (`Fitter.allowance`) instead of the task's fixed max_new_tokens.
    answer: str | None = None


Render = Callable[[Random, int], Draft]


@dataclass(frozen=True)
class UnitPlan:
    """How a task grows: `render(rng, n)` builds the sample with n haystack units.

    `render` must draw everything from the rng it is given, so the same seed and n always
    give the same text. Searches start at `increment` units; `linear_start` selects fwe's
    linear search instead of a binary one; `min_units` is the fewest units `render` can place
    its needles among; `max_units` bounds finite pools (cwe).
    """

    render: Render
    increment: int
    min_units: int = 1
    upper_factor: float = 3.0
    linear_start: int | None = None
    max_units: int | None = None


@dataclass(frozen=True)
class Setup:
    """What one generation request fixes for all its samples."""

    tokenizer: Any
    task: str
    length: int
    seed: int
    max_new_tokens: int
    query_aware: bool


@dataclass(frozen=True)
class Fitted:
    """A sample that fits: its draft, its number of units and its measured length."""

    draft: Draft
    units: int
    length: int


class Fitter:
    """Searches the number of haystack units that fills `setup.length` tokens."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    def measure(self, draft: Draft) -> int:
        """Tokens the harness will use for this draft, generation allowance included."""
        parts = split_prompt(
            self.setup.tokenizer, draft.context, draft.question, draft.answer_prefix, self.setup.query_aware
        )
        return len(parts.context_ids) + len(parts.question_ids) + self.allowance(draft)

    def allowance(self, draft: Draft) -> int:
        """Tokens the sample may generate: the task's max_new_tokens, or for a draft that carries its whole answer,
        that answer's tokens plus a quarter (room for another wording) and 16."""
        if draft.answer is None:
            return self.setup.max_new_tokens
        answer = len(self.setup.tokenizer(draft.answer, add_special_tokens=False)["input_ids"])
        return answer + answer // 4 + 16

    def _attempt(self, plan: UnitPlan, seed: int, units: int) -> tuple[Draft, int]:
        draft = plan.render(Random(seed), units)
        return draft, self.measure(draft)

    def _fits(self, plan: UnitPlan, seed: int, units: int) -> bool:
        return self._attempt(plan, seed, units)[1] <= self.setup.length

    def _too_small(self, units: int, needed: int) -> TaskError:
        s = self.setup
        return TaskError(
            f"{s.task}: length {s.length} is too small; a prompt with {units} haystack units"
            f" needs {needed} tokens including {s.max_new_tokens} for generation"
        )

    def _pool_exhausted(self, plan: UnitPlan) -> TaskError:
        return TaskError(
            f"{self.setup.task}: length {self.setup.length} needs more than the {plan.max_units}"
            " units its word pool holds; use a shorter length"
        )

    def search(self, plan: UnitPlan, seed: int) -> int:
        """Largest n that fits for the sample drawn from `seed` (the starting point for every sample)."""
        shortest = self._attempt(plan, seed, plan.increment)[1]
        if shortest > self.setup.length:
            raise self._too_small(plan.increment, shortest)
        if plan.linear_start is not None:
            return self.fit(plan, seed, plan.linear_start).units
        return self._binary_search(plan, seed, shortest)

    def _binary_search(self, plan: UnitPlan, seed: int, shortest: int) -> int:
        cap = plan.max_units if plan.max_units is not None else float("inf")
        tokens_per_unit = shortest / plan.increment
        upper = int(min(cap, max(2 * plan.increment, plan.upper_factor * self.setup.length / tokens_per_unit)))
        # The estimate includes the template overhead, so it can undershoot: grow until it fails.
        while upper < cap and self._fits(plan, seed, upper):
            upper = int(min(cap, 2 * upper))
        low, best = plan.increment, plan.increment
        while low <= upper:
            middle = (low + upper) // 2
            if self._fits(plan, seed, middle):
                best, low = middle, middle + 1
            else:
                upper = middle - 1
        return best

    def fit(self, plan: UnitPlan, seed: int, start: int) -> Fitted:
        """Largest n for this sample: step from `start` by whole increments, then bisect.

        RULER stops after stepping down by increments, which leaves a sample up to one
        increment short whenever its random content is a little longer than the probe's. The
        bisection (about log2(increment) more renders) ends with n fitting and n + 1 not.
        """
        length_limit = self.setup.length
        units = max(start, plan.min_units)
        if plan.max_units is not None:
            units = min(units, plan.max_units)
        draft, length = self._attempt(plan, seed, units)
        if length > length_limit:
            while length > length_limit:
                lower = max(units - plan.increment, plan.min_units)
                if lower == units:
                    raise self._too_small(units, length)
                too_long, units = units, lower
                draft, length = self._attempt(plan, seed, units)
        else:
            while True:
                grown = units + plan.increment
                if plan.max_units is not None:
                    grown = min(grown, plan.max_units)
                if grown == units:
                    raise self._pool_exhausted(plan)
                bigger, bigger_length = self._attempt(plan, seed, grown)
                if bigger_length > length_limit:
                    too_long = grown
                    break
                draft, length, units = bigger, bigger_length, grown
        while too_long - units > 1:
            middle = (units + too_long) // 2
            candidate, candidate_length = self._attempt(plan, seed, middle)
            if candidate_length <= length_limit:
                draft, length, units = candidate, candidate_length, middle
            else:
                too_long = middle
        return Fitted(draft, units, length)

"""Variable tracking (tasks.md §5): follow a chain of assignments hidden in noise."""

from __future__ import annotations

import string
from dataclasses import dataclass, replace
from random import Random

from kvbench.tasks.fingerprint import derive_seed
from kvbench.tasks.generated.fitting import Draft, Fitter, Setup, UnitPlan
from kvbench.tasks.generated.haystacks import NOISE_SENTENCE
from kvbench.tasks.generated.templates import fill_template

TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above,"
    " {num_v} variables are assigned the value {query}, they are: "
)
HOPS = 4
NAME_LENGTH = 5
EXAMPLE_NAME_LENGTH = 3
EXAMPLE_LENGTH = 500
EXAMPLE_VALUE = 12345


@dataclass(frozen=True)
class Layout:
    """Where the chain lines sit among `lines` noise lines (indices before insertion)."""

    lines: int
    positions: tuple[int, ...]


def _names(rng: Random, length: int) -> list[str]:
    """HOPS + 1 distinct uppercase names; never `VAR`, which would read as the keyword."""
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(length))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def _value(rng: Random, other: int | None = None) -> int:
    while True:
        value = rng.randint(10000, 99998)
        if value != other:
            return value


def chain(names: list[str], value: int) -> list[str]:
    """`VAR A = value`, then `VAR B = VAR A ` ... (the trailing space is RULER's)."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(HOPS)]


def _layout(rng: Random, lines: int) -> Layout:
    return Layout(lines, tuple(sorted(rng.sample(range(lines), HOPS + 1))))


def _prompt(layout: Layout, names: list[str], value: int) -> tuple[str, str, str]:
    lines = [NOISE_SENTENCE] * layout.lines
    for i, (position, line) in enumerate(zip(layout.positions, chain(names, value))):
        lines.insert(position + i, line)
    haystack = "\n".join(lines).replace(". \n", ".\n")
    context, question = fill_template(TEMPLATE, haystack, query=value)
    return context, question, ANSWER_PREFIX.format(num_v=HOPS + 1, query=value)


def _render_example(rng: Random, units: int) -> Draft:
    names = _names(rng, EXAMPLE_NAME_LENGTH)
    layout = _layout(rng, units)
    context, question, answer_prefix = _prompt(layout, names, EXAMPLE_VALUE)
    return Draft(context, question, answer_prefix, names, {"layout": layout})


def increment(length: int) -> int:
    """Noise grows by 10 lines (5 below 4K tokens)."""
    return 5 if length < 4096 else 10


def example_layout(setup: Setup) -> Layout:
    """The in-context example's layout, fitted once at 500 tokens with the target tokenizer."""
    example_fitter = Fitter(replace(setup, task=f"{setup.task} example", length=EXAMPLE_LENGTH))
    example_seed = derive_seed(setup.seed, "vt", "example")
    example_plan = UnitPlan(render=_render_example, increment=increment(EXAMPLE_LENGTH), min_units=HOPS + 1)
    units = example_fitter.search(example_plan, example_seed)
    return _render_example(Random(example_seed), units).metadata["layout"]


def render(example: Layout, rng: Random, units: int) -> Draft:
    """One vt sample: a solved example with fresh names and value, then the task."""
    names = _names(rng, NAME_LENGTH)
    value = _value(rng)
    example_names = _names(rng, EXAMPLE_NAME_LENGTH)
    example_value = _value(rng, other=value)
    layout = _layout(rng, units)
    shot_context, shot_question, shot_prefix = _prompt(example, example_names, example_value)
    shot = shot_context + shot_question + shot_prefix + " ".join(example_names) + "\n"
    context, question, answer_prefix = _prompt(layout, names, value)
    return Draft(
        context=shot + context,
        question=question,
        answer_prefix=answer_prefix,
        references=names,
        metadata={"chain_lines": [p + i for i, p in enumerate(layout.positions)], "value": value},
    )


def plan(setup: Setup) -> UnitPlan:
    """Fit the example once, then grow the task's own haystack."""
    example = example_layout(setup)
    return UnitPlan(
        render=lambda rng, units: render(example, rng, units),
        increment=increment(setup.length),
        min_units=HOPS + 1,
    )

"""A long arithmetic chain (offline long generation): the model writes one line per operation, so the answer is
longer than the prompt and a decode-time method's cache grows while it writes. Checked exactly, line by line.

Each sample starts from a number and lists `units` operations (add or subtract a one-digit number, values kept
between 0 and 99); the answer is `step k: OPERATION, x = VALUE` per operation, then `final: x = VALUE`. Two exact
scores (tasks/metrics/chain.py): `chain_steps`, the fraction of steps whose line states the right value, and
`chain_operations`, the fraction that restate their operation (a copy from the context, which a cache that
dropped it loses); lines are read by their step number, so a skipped line costs that step only.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from kvbench.tasks.generated.fitting import Draft, Setup, UnitPlan

INTRO = (
    "Keep track of a number x through a list of operations. Example: start with x = 4; operations: 1. add 3, "
    "2. subtract 5. Answer:\nstep 1: add 3, x = 7\nstep 2: subtract 5, x = 2\nfinal: x = 2\n"
)
QUESTION = (
    "Apply the {count} operations in order. Write one line per operation, `step N: OPERATION, x = VALUE`, with x "
    "after that operation, from step 1 to step {count}, then `final: x = VALUE`."
)
ANSWER_PREFIX = "\nstep 1:"


def operations(rng: Random, units: int) -> tuple[int, list[tuple[str, int]], list[int]]:
    """The start, the operations and x after each: adding when x < 50 is more likely, so x stays in 0..99 and
    never goes below 0."""
    x = rng.randint(10, 60)
    start, ops, values = x, [], []
    for _ in range(units):
        amount = rng.randint(1, 9)
        adding = x < amount or (x < 90 and rng.random() < (0.7 if x < 50 else 0.3))
        x = x + amount if adding else x - amount
        ops.append(("add" if adding else "subtract", amount))
        values.append(x)
    return start, ops, values


def answer_text(ops: Sequence[tuple[str, int]], values: Sequence[int]) -> str:
    lines = [f"step {k}: {verb} {amount}, x = {value}" for k, ((verb, amount), value) in enumerate(zip(ops, values), 1)]
    return "\n".join([*lines, f"final: x = {values[-1]}"])


def render(rng: Random, units: int) -> Draft:
    start, ops, values = operations(rng, units)
    listed = "\n".join(f"{k}. {verb} {amount}" for k, (verb, amount) in enumerate(ops, start=1))
    return Draft(
        context=f"{INTRO}\nStart with x = {start}. Operations:\n{listed}\n",
        question=QUESTION.format(count=units),
        answer_prefix=ANSWER_PREFIX,
        references=[
            f"step {k}: {verb} {amount}, x = {value}" for k, ((verb, amount), value) in enumerate(zip(ops, values), 1)
        ],
        metadata={"steps": units, "start": start},
        answer=answer_text(ops, values),
    )


def plan(setup: Setup) -> UnitPlan:
    """Grow by 4 operations (about 20 prompt and 30 answer tokens each)."""
    return UnitPlan(render=render, increment=4)

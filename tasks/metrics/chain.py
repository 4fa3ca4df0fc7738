"""The arithmetic chain's exact checks (tasks/generated/chain.py): answer lines `step k: OPERATION, x = VALUE`, read
by their step number, so a skipped or repeated line costs that step only."""

from __future__ import annotations

import re
from collections.abc import Sequence

# The value part is optional: a line that restates its operation without a value still counts for chain_operations.
LINE = re.compile(r"step\s+(\d+)\s*:\s*(add|subtract)\s+(\d+)(?:\s*,\s*x\s*=\s*(-?\d+))?", re.IGNORECASE)
# The answer prefix ends with `step 1:`, so an answer opens with step 1's operation and value.
OPENING = re.compile(r"\s*(add|subtract)\s+(\d+)(?:\s*,\s*x\s*=\s*(-?\d+))?", re.IGNORECASE)


def _lines(text: str, opens: bool) -> dict[int, tuple[str, int, int | None]]:
    """Step number -> (operation, amount, value or None), the first line of each step."""
    found: dict[int, tuple[str, int, int | None]] = {}
    opening = OPENING.match(text) if opens else None
    if opening:
        verb, amount, value = opening.groups()
        found[1] = (verb.lower(), int(amount), int(value) if value else None)
    for step, verb, amount, value in LINE.findall(text):
        found.setdefault(int(step), (verb.lower(), int(amount), int(value) if value else None))
    return found


def _expected(references: Sequence[str]) -> dict[int, tuple[str, int, int]]:
    if not references:
        raise ValueError("cannot score a chain without its steps")
    return _lines("\n".join(references), opens=False)


def chain_steps(prediction: str, references: Sequence[str]) -> float:
    """The fraction of steps whose line states the right value of x after that step, exactly."""
    expected, stated = _expected(references), _lines(prediction, opens=True)
    return sum(k in stated and stated[k][2] == v for k, (_, _, v) in expected.items()) / len(expected)


def chain_operations(prediction: str, references: Sequence[str]) -> float:
    """The fraction of steps whose line restates that step's operation exactly (a copy from the context, which
    the model must still see: what a cache that dropped it loses)."""
    expected, stated = _expected(references), _lines(prediction, opens=True)
    return sum(k in stated and stated[k][:2] == op[:2] for k, op in expected.items()) / len(expected)

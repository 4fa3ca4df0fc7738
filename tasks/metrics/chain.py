"""The arithmetic chain's exact check (tasks/generated/chain.py): step lines read by their number."""

from __future__ import annotations

import re
from collections.abc import Sequence

STEP = re.compile(r"step\s+(\d+)\s*:\s*x\s*=\s*(-?\d+)", re.IGNORECASE)


def chain_steps(prediction: str, references: Sequence[str]) -> float:
    """The fraction of steps k whose first `step k: x = V` line in the prediction states the reference's V exactly
    (references are `step k: x = V`, one per step)."""
    if not references:
        raise ValueError("cannot score a chain without its steps")
    expected = {int(k): int(v) for k, v in (STEP.match(reference).groups() for reference in references)}
    stated: dict[int, int] = {}
    for k, v in STEP.findall(prediction):
        stated.setdefault(int(k), int(v))
    return sum(stated.get(k) == v for k, v in expected.items()) / len(expected)

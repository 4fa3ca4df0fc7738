"""The comma-separated lists a sweep is given (`--methods`, `--budgets`, `--tasks`, `--lengths`) as Python lists:
torch-free, so the CLI checks them before any slow import and the sweep parses them the same way."""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from kvbench.harness.errors import KVBenchError, check_budget
from kvbench.harness.token_budget import budget_label, parse_budget

T = TypeVar("T")


def split_list(text: str, what: str) -> list[str]:
    """The items as given, repeats included: the checks look at every one, `distinct` merges them."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise KVBenchError(f"--{what} is empty; give a comma-separated list")
    return items


def distinct(
    items: Sequence[str], what: str, parse: Callable[[str], T], key: Callable[[T], Hashable] = lambda value: value
) -> list[T]:
    """Each item parsed, once per distinct `key`, in the order given. Items that name the same thing (0.5 and 0.50,
    or snapkv and snapkv:window=64 where 64 is the default) would run the same cells: they run once, and the user is
    told so on stderr, once per merged item, so that what ran is what they read."""
    kept: dict[Hashable, T] = {}
    given: dict[Hashable, list[str]] = {}
    for item in items:
        value = parse(item)
        kept.setdefault(key(value), value)
        given.setdefault(key(value), []).append(item)
    for name, spellings in given.items():
        if len(spellings) > 1:
            print(f"kvbench: note: {_repeat_note(what, name, spellings)}", file=sys.stderr)
    return list(kept.values())


def _repeat_note(what: str, name: Hashable, spellings: list[str]) -> str:
    shown = format(name, "g") if isinstance(name, float) else str(name)
    times = "twice" if len(spellings) == 2 else f"{len(spellings)} times"
    written = "" if set(spellings) == {shown} else f" (as {', '.join(dict.fromkeys(spellings))})"
    return f"--{what} lists {shown} {times}{written}; it runs once"


def parse_list(text: str, what: str) -> list[str]:
    return distinct(split_list(text, what), what, str)


def parse_budgets(text: str, tokens: bool = False) -> list[float]:
    """Fractions in (0, 1]; with `tokens`, also token budgets per KV head (`256t`, see `harness/token_budget.py`)."""
    return distinct(split_list(text, "budgets"), "budgets", parse_budget if tokens else check_budget, key=budget_label)


def parse_length(item: str) -> int:
    try:
        value = int(item)
    except ValueError:
        raise KVBenchError(f"length {item!r} is not a whole number of tokens") from None
    if value < 1:
        raise KVBenchError(f"length {value} must be a positive number of tokens")
    return value


def check_lengths(text: str) -> list[int]:
    return [parse_length(item) for item in split_list(text, "lengths")]


def parse_lengths(text: str) -> list[int]:
    return distinct(split_list(text, "lengths"), "lengths", parse_length)

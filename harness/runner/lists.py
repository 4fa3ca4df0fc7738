"""The comma-separated lists a sweep is given (`--methods`, `--budgets`, `--tasks`, `--lengths`) as Python lists:
torch-free, so the CLI checks them before any slow import and the sweep parses them the same way."""

from __future__ import annotations

from kvbench.harness.errors import KVBenchError


def split_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise KVBenchError(f"--{what} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))


def check_lengths(text: str) -> list[int]:
    lengths = []
    for item in split_list(text, "lengths"):
        try:
            value = int(item)
        except ValueError:
            raise KVBenchError(f"length {item!r} is not a whole number of tokens") from None
        if value < 1:
            raise KVBenchError(f"length {value} must be a positive number of tokens")
        lengths.append(value)
    return lengths

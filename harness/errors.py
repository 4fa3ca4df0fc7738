"""Errors a user can cause, reported by the CLI as one line and exit code 2."""


class KVBenchError(Exception):
    """A problem with the user's input or environment; its message says what to do."""


class UnknownNameError(KVBenchError):
    """An unknown method, task or model name; the message lists the valid choices."""


class BudgetError(KVBenchError, ValueError):
    """A budget outside (0, 1], or one a method cannot reach for this context."""


class Unsupported(BudgetError):
    """A cell kvbench cannot run as asked on this model and context (a method that cannot read this architecture,
    a sliding window that no longer covers what a method kept): refused like an unreachable budget, so a sweep
    records it with its one-line reason and goes on."""


def check_budget(budget: float) -> float:
    """Budgets are fractions of the full cache's context bytes, so only (0, 1] means anything."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise BudgetError(f"budget {budget!r} is not a number; use a fraction in (0, 1], e.g. 0.25") from None
    if not 0.0 < value <= 1.0:
        raise BudgetError(f"budget {value:g} is outside (0, 1]; use a fraction of the full cache, e.g. 0.25")
    return value

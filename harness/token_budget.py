"""Budgets in tokens per KV head (`--budgets 256t,1024t`) beside fractional ones (`0.25`), torch-free.

A fractional budget b is a fraction of the context's full-cache bytes. A token budget `Tt` keeps at most T tokens
per KV head: for a method that compresses once, the context's T tokens per head (all of it when the context is
shorter); for a decode-time method (`decoding`), context and generated tokens together. What the cache holds is
still measured in bytes, so a token budget is turned into the fraction of this context's bytes that T tokens per
head take (`for_context`), and a method's decode state comes out of it as from any budget (issue 33).

A sweep carries a token budget as a `TokenBudget`: a float whose value is T (never in (0, 1) where fractions
live, so a store's rows of `0.25` and `256t` never share a cell), and rows record `budget_tokens: T` beside it.
"""

from __future__ import annotations

import math

from kvbench.harness.errors import BudgetError, check_budget


class TokenBudget(float):
    """T tokens per KV head. Its float value is T, so sorting, rounding and JSON treat it as a number."""

    def __new__(cls, tokens: int):
        if isinstance(tokens, bool) or int(tokens) != tokens or tokens < 1:
            raise BudgetError(f"token budget {tokens!r} must be a whole number of tokens, at least 1 (e.g. 256t)")
        return super().__new__(cls, int(tokens))

    @property
    def tokens(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"{self.tokens}t"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return f"{self.tokens}t" if spec in ("", "g") else float.__format__(self, spec)

    def __reduce__(self):
        return (TokenBudget, (self.tokens,))


class ContextBudget(float):
    """A token budget on one context: its float value is the fraction of the context's bytes that `tokens` per
    head take (1 when the context is shorter), the one every method reads; `tokens` stays for the methods that
    act while decoding, where the generated tokens count too."""

    def __new__(cls, fraction: float, tokens: int):
        value = super().__new__(cls, fraction)
        value.tokens = tokens
        return value

    def __reduce__(self):
        return (ContextBudget, (float(self), self.tokens))


def fraction_of(tokens: int, context_length: int) -> float:
    """The smallest fraction b with int(b·N) = tokens (1 when tokens ≥ N): T/N, nudged up where the float product
    would round below T, so that every method's int(b·N) keeps exactly T tokens per head."""
    if tokens >= context_length:
        return 1.0
    fraction = tokens / context_length
    while int(context_length * fraction) < tokens:
        fraction = math.nextafter(fraction, 2.0)
    return fraction


def for_context(budget: float, context_length: int) -> float:
    """What a cell's budget means on a context of `context_length` tokens: a fraction as given, a token budget as
    a `ContextBudget`."""
    if isinstance(budget, TokenBudget):
        return ContextBudget(fraction_of(budget.tokens, context_length), budget.tokens)
    return budget


def budget_tokens(budget: float) -> int | None:
    """T of a token budget (as given or on a context), None for a fraction."""
    return getattr(budget, "tokens", None) if isinstance(budget, (TokenBudget, ContextBudget)) else None


def parse_budget(text: str | float) -> float:
    """`0.25` (a fraction in (0, 1]) or `256t` (tokens per KV head); one line for anything else."""
    if isinstance(text, TokenBudget):
        return text
    if isinstance(text, str) and text.strip().lower().endswith("t"):
        count = text.strip()[:-1].strip()
        if not count.isdigit() or int(count) < 1:
            raise BudgetError(
                f"budget {text!r} is not a token count; write a whole number of tokens per KV head, e.g. 256t"
            )
        return TokenBudget(int(count))
    return check_budget(text)


def budget_label(budget: float) -> str:
    """How a budget is written: `0.25`, `256t`."""
    tokens = budget_tokens(budget)
    return f"{tokens}t" if tokens is not None else f"{float(budget):g}"

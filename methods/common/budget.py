"""Tokens per KV head when a method's decode state comes out of the same budget as its keys and values.

The budget is a ceiling on everything the cache holds (DESIGN §3, "everything a method keeps is cache"): a method
that keeps state between decode steps (running scores, positions, features, a query window) pays for it from its
token budget, so that kept keys and values plus that state stay within b of the full cache. `TokenCost` says what
the state costs right after compression, as the harness measures it (`stored_bytes`), and `tokens` turns a budget
into the most tokens per head that leave room for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.harness.engine.prefill import Observation
from kvbench.harness.errors import BudgetError


@dataclass(frozen=True)
class TokenCost:
    """Bytes over the layers a method compresses: `kv` what one more kept token per KV head costs in keys and
    values, `state` what it costs in the method's decode state, `fixed` the decode state that does not depend on
    the tokens kept (a window of queries)."""

    kv: int
    state: int = 0
    fixed: int = 0

    def held(self, tokens: int) -> int:
        """Bytes the cache holds with `tokens` kept per KV head."""
        return tokens * (self.kv + self.state) + self.fixed

    def tokens(self, context_length: int, budget: float) -> int:
        """The most tokens per KV head, at most int(b·N), whose keys, values and state fit b of the full bytes
        (N·kv); 0 when the state alone takes the budget. Without state this is int(b·N), as everywhere else, and
        so it is where int(b·N) covers the context: a method that keeps every token has nothing to evict and
        keeps no decode state."""
        most = int(context_length * budget)
        if (not self.state and not self.fixed) or most >= context_length:
            return most
        allowed = budget * context_length * self.kv
        tokens = min(most, max(0, math.floor((allowed - self.fixed) / (self.kv + self.state))))
        while tokens and self.held(tokens) > allowed:  # the float division may round up at the boundary
            tokens -= 1
        return tokens

    def lowest_budget(self, context_length: int, tokens: int) -> float:
        """The smallest budget in steps of 0.001 that keeps `tokens` per head (1 where only the whole context
        does): the figure a refusal names, checked with `tokens` itself."""
        if tokens >= context_length:
            return 1.0
        steps = max(1, math.ceil(self.held(tokens) / (context_length * self.kv) * 1000))
        while steps < 1000 and self.tokens(context_length, steps / 1000) < tokens:
            steps += 1
        return min(steps, 1000) / 1000

    def kept(self, who: str, context_length: int, budget: float, least: int = 1, why: str = "one") -> int:
        """`tokens`, refused in one line naming the lowest reachable budget when fewer than `least` (`why` says
        what they are: "one", "its window + 1 = 9")."""
        tokens = self.tokens(context_length, budget)
        if tokens < least:
            raise BudgetError(
                f"{who} at budget {budget:g} keeps {tokens} tokens per head of this {context_length}-token context"
                f"{self._paid()}, fewer than {why}; the lowest reachable budget is "
                f"{self.lowest_budget(context_length, least):g}"
            )
        return tokens

    def _paid(self) -> str:
        if not self.state and not self.fixed:
            return ""
        return f" once its decode state ({self.state:,} bytes per kept token, {self.fixed:,} fixed) is paid"


# Keys and values alone, no decode state: int(b·N) tokens per head, whatever a token's bytes.
KEYS_AND_VALUES = TokenCost(kv=1)


def kv_cost(observation: Observation, state_per_head: int = 0, fixed: int = 0) -> TokenCost:
    """The cost of keeping tokens of this observation's compressed layers: their keys and values in the observed
    dtype, plus `state_per_head` bytes of decode state per kept token of each KV head and `fixed` bytes of decode
    state in all."""
    layers = observation.compressed_layers()
    kv = sum(observation.layer_bytes(layer) for layer in layers) // observation.context_length
    heads = sum(int(observation.keys[layer].shape[0]) for layer in layers)
    return TokenCost(kv, heads * state_per_head, fixed)

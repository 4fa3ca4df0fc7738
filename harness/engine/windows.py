"""Sliding-window layers in a compressed cache, and what the budget means for models that have them.

A layer with a sliding window W only ever attends to the last W positions, so transformers' own cache holds at
most its last W − 1 context tokens: it is bounded already. kvbench keeps exactly that for such a layer, whatever
the method (`full` included), and lets the method compress the layers whose cache grows with the context:

- `kv_bytes_full` is what a plain transformers cache holds for the model at that length, window layers at their
  window (`Observation.kv_bytes_full`);
- a budget b is a fraction of that; the window layers' bytes are spent first, and the method compresses the
  other layers to what is left: b_rest = (b · full − windows) / rest. A budget below windows / full cannot be
  reached and is refused in one line, naming the lowest one;
- a layer whose window is longer than the context holds the whole context, like a full-attention layer, and is
  compressed like one. Its window still applies while decoding, in original positions.

Models without windows (Llama, Qwen2, ...) are untouched: every layer is compressed at b.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbench.harness.cache.prefix import LayerPrefix, Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.harness.errors import BudgetError, Unsupported

if TYPE_CHECKING:
    from kvbench.methods.base import Method


def window_prefix(observation: Observation, layer: int, kept: int) -> TokenPrefix:
    """The last `kept` context tokens of the layer, with their original positions (what transformers keeps)."""
    n = observation.context_length
    keys, values = observation.keys[layer], observation.values[layer]
    return TokenPrefix(keys[:, n - kept :], values[:, n - kept :], first_position=n - kept)


def budget_for_the_rest(observation: Observation, budget: float, label: str) -> float:
    """The budget the method gets for the layers it compresses, once the window layers took theirs."""
    windowed = observation.windowed_layers()
    if not windowed or budget >= 1.0:
        return budget
    full = observation.kv_bytes_full()
    windows = sum(observation.layer_bytes(layer) for layer in windowed)
    rest = full - windows
    if rest <= 0 or budget * full <= windows:
        lowest = windows / full
        raise BudgetError(
            f"{label} at budget {budget:g}: at {observation.context_length} tokens this model's sliding-window "
            f"layers alone hold {lowest:.3f} of the cache (kvbench keeps their windows as transformers does); "
            + ("no layer is left to compress" if rest <= 0 else f"budgets up to {lowest:.3f} cannot be reached")
        )
    return min(1.0, (budget * full - windows) / rest)


def with_windows(observation: Observation, prefixes: list[LayerPrefix | None]) -> list[LayerPrefix]:
    """The method's prefixes with each window layer's replaced by its window (the method's decode state kept). A
    method may leave a window layer's entry None (`Observation.compressed_layers` says which it compresses)."""
    windowed = observation.windowed_layers()
    if not windowed:
        return prefixes
    merged = [
        window_prefix(observation, layer, windowed[layer]) if layer in windowed else p
        for layer, p in enumerate(prefixes)
    ]
    return Prefixes(merged, getattr(prefixes, "decode_state", None))


def refuse_what_windows_break(method: Method, observation: Observation) -> None:
    """A method that rewrites the cache while decoding would rewrite the windows too (and lose their positions):
    refused in one line on models whose windows are shorter than the context, until it learns to leave them."""
    if observation.windowed_layers() and method.acts_while_decoding and not method.leaves_windows:
        raise Unsupported(
            f"{method.label} evicts while decoding, which would rewrite this model's sliding-window layers; "
            "kvbench does not run it on models whose windows are shorter than the context yet"
        )

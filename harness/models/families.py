"""What a model's architecture needs from kvbench, read from its config alone (no torch, no weights).

kvbench serves a model exactly when its attention goes through transformers' `AttentionInterface` and everything
that attention applies is applied by kvbench's attention function (scaling, sliding windows, logit soft-capping,
sinks: `kvbench.harness.cache.attention.LayerAttention`). Two kinds of model are refused in one line before their
weights load, naming the feature: caches that are not per-token keys and values (multi-head latent attention,
recurrent or convolutional state of hybrid and state-space models) and attention patterns kvbench does not
reproduce (chunked attention).

Sliding-window layers are served: a layer with a window W holds, as transformers' own cache does, the last W − 1
tokens of a longer context, so `kept_positions` is what a plain transformers cache holds per layer at a length
(the budget's denominator), and such a layer keeps its window whatever the method (see
`kvbench.harness.engine.windows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvbench.harness.errors import KVBenchError

# Layer types whose cache is per-token keys and values with (at most) a sliding window.
ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention"})
# Config fields that only recurrent, convolutional or state-space layers have.
_RECURRENT_FIELDS = ("mamba_d_state", "ssm_state_size", "mamba_n_heads", "conv_L_cache", "linear_num_value_heads")


def _as_dict(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.to_dict() if hasattr(text, "to_dict") else vars(text)


def unsupported_feature(config: Any) -> str | None:
    """Why kvbench cannot serve a model of this config exactly (one phrase), or None if it can."""
    fields = _as_dict(config)
    if fields.get("kv_lora_rank"):
        return (
            "multi-head latent attention (DeepSeek-V2/V3, Kimi): its cache holds per-token latents, not keys and "
            "values per head"
        )
    layer_types = fields.get("layer_types") or []
    other = sorted({t for t in layer_types if t not in ATTENTION_LAYERS})
    if other or any(fields.get(name) is not None for name in _RECURRENT_FIELDS):
        kinds = ", ".join(other) if other else "state-space"
        return f"recurrent or convolutional layers ({kinds}) whose state kvbench's cache does not carry"
    if fields.get("attention_chunk_size"):
        return "chunked attention (attention_chunk_size), which kvbench's attention does not reproduce"
    if fields.get("is_encoder_decoder"):
        return "an encoder-decoder architecture; kvbench compresses decoder-only causal models"
    return None


def check_supported(name: str, config: Any) -> None:
    """Refuse, in one line, a model kvbench cannot serve exactly."""
    feature = unsupported_feature(config)
    if feature is not None:
        raise KVBenchError(f"model {name} is not supported: {feature}")


def sliding_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers builds its cache layers: from
    `layer_types`, or a bare `sliding_window` that applies to every layer (Mistral, Phi-3, Mixtral)."""
    fields = _as_dict(config)
    layers = int(fields["num_hidden_layers"])
    window = fields.get("sliding_window")
    layer_types = fields.get("layer_types")
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:layers]]
    if fields.get("use_sliding_window") is False:
        return [None] * layers
    return [window] * layers if window else [None] * layers


def kept_positions(config: Any, context_length: int) -> list[int]:
    """Context positions a plain transformers cache holds per layer after a prefill of `context_length` tokens:
    all of them, or a sliding window's last W − 1."""
    return [context_length if w is None else min(context_length, w - 1) for w in sliding_windows(config)]

"""Tiny random models of every family kvbench must serve exactly (issue 29's matrix), built in-process.

Random tiny models attend almost uniformly, which hides a sliding window, a logit cap or an attention sink: every
attention module's `scaling` is multiplied (the same for transformers' own attention and kvbench's, since both
receive it), windows are a few tokens long, and sinks are large, so that each feature changes the output; the
tests show that it does by switching it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers

VOCAB = 256
WINDOW = 12
SHARPEN = 12.0

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@dataclass(frozen=True)
class Family:
    """A model family: its config class, causal-LM class, the config fields that make it that family, and which
    features its attention applies (what switching them off means: config fields to override)."""

    config: str
    model: str
    fields: dict = field(default_factory=dict)
    # feature name -> config overrides that switch it off
    features: dict = field(default_factory=dict)
    # Why kvbench refuses it (None: served).
    refused: str | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM"),
    "llama3-rope": Family(
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            }
        },
    ),
    "mistral-window": Family(
        "MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}, {"window": {"sliding_window": None}}
    ),
    "mixtral-window": Family(
        "MixtralConfig",
        "MixtralForCausalLM",
        {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
        {"window": {"sliding_window": None}},
    ),
    "qwen2-sliding-layers": Family(
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
        {"window": {"use_sliding_window": False}},
    ),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3-moe-window": Family(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "head_dim": 16,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
        {"window": {"use_sliding_window": False, "sliding_window": None}},
    ),
    "gemma2": Family(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "attn_logit_softcapping": 1.0},
        {"window": {"sliding_window": 4096}, "softcap": {"attn_logit_softcapping": None}},
    ),
    "gemma3": Family(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "num_hidden_layers": 6},
        {"window": {"sliding_window": 4096}},
    ),
    "phi3-window": Family(
        "Phi3Config", "Phi3ForCausalLM", {"sliding_window": WINDOW}, {"window": {"sliding_window": None}}
    ),
    "gpt-neox": Family(
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "num_key_value_heads": None,  # multi-head attention: its real configs name no KV heads
        },
    ),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM"),
    "cohere": Family("CohereConfig", "CohereForCausalLM"),
    "cohere2": Family(
        "Cohere2Config", "Cohere2ForCausalLM", {"sliding_window": WINDOW}, {"window": {"sliding_window": 4096}}
    ),
    "gpt-oss": Family(
        "GptOssConfig",
        "GptOssForCausalLM",
        {"head_dim": 16, "sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
        {"window": {"sliding_window": 4096}, "sinks": {}},
    ),
    "deepseek-v3-mla": Family(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "kv_lora_rank": 16,
            "q_lora_rank": 24,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        refused="multi-head latent attention",
    ),
    "lfm2-hybrid": Family(
        "Lfm2Config",
        "Lfm2ForCausalLM",
        {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "intermediate_size": 96},
        refused="recurrent",
    ),
}


def family_config(name: str, **overrides) -> transformers.PretrainedConfig:
    family = FAMILIES[name]
    config_class = getattr(transformers, family.config)
    kwargs = {**COMMON, **family.fields}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}  # a family drops a common field
    config = config_class(**{**kwargs, **overrides})
    return config


def family_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A sharpened random model of the family, fp32, eval mode, deterministic from `seed` (the same weights with
    any `overrides` of its config, so a feature can be switched off on the very same model)."""
    family = FAMILIES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, family.model)(family_config(name, **overrides))
    _sharpen(model, sink_logit=3.0)
    return model.eval()


def _sharpen(model: torch.nn.Module, sink_logit: float) -> None:
    """Make attention decisive: scale every attention module's logits, and set GPT-OSS's sinks (3: they take a
    real share of the probability; -1e4: none)."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
        for module in model.modules():
            if hasattr(module, "scaling") and hasattr(module, "layer_idx"):
                module.scaling = module.scaling * SHARPEN
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.fill_(sink_logit)


def switched_off(name: str, feature: str, seed: int = 0) -> torch.nn.Module:
    """The same weights with one attention feature switched off (a config override, or sinks that take nothing)."""
    model = family_model(name, seed, **FAMILIES[name].features[feature])
    if feature == "sinks":
        with torch.no_grad():
            for module in model.modules():
                if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                    module.sinks.fill_(-1e4)
    return model


def random_ids(n: int, seed: int = 0, low: int = 8) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB - 10, (n,), generator=generator).tolist()

"""ExpectedAttention: keep the tokens future queries are expected to attend to, in closed form from the
context's query statistics (Devoto et al., arXiv 2510.00636; kvpress's ExpectedAttentionPress)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import Unsupported
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import keep_scored, tokens_for_budget


@dataclass(frozen=True)
class ExpectedAttentionConfig:
    """arXiv 2510.00636 with kvpress's defaults: 512 future positions, 4 sink tokens, covariance and value-norm
    weighting on, ε = 0 (kvpress's preset "expected_attention" is AdaKV over this with ε = 1e-2:
    `adakv:base=expected_attention:base_options=epsilon=0.01`).

    Future queries are modelled as Gaussian with the mean μ and covariance Σ of the context's pre-RoPE queries
    (first n_sink positions left out), rotated by the RoPE matrix averaged over the next n_future_positions
    positions; a key's expected logit is then μ̄·k/√d + kᵀΣ̄k/(2d) (the log of E[exp(q·k/√d)]), softmaxed over
    the non-sink tokens and averaged over the query group. Σ is the population covariance of those queries,
    divided by N − n_sink as kvpress does. The model's softmax scale stands in for 1/√d (the model's own scale:
    1/√query_pre_attn_scalar on Gemma).

    The pre-RoPE queries are recomputed from each layer's input hidden states through the model's own modules,
    and checked against the post-RoPE queries the model really used (recorded through the attention function):
    the rotary layout that reproduces them is used, and a model whose queries cannot be reproduced is refused in
    one line rather than scored from the wrong queries (`verified_rotation`).
    """

    n_future_positions: int = option(512, at_least=1)
    n_sink: int = option(4, at_least=0)
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = option(0.0, at_least=0)


# Post-RoPE queries of the context's last positions, recorded through the attention function: what the derived
# queries and rotations are checked against.
CHECKED_POSITIONS = 8


def _refuse(what: str) -> Unsupported:
    return Unsupported(f"expected_attention cannot derive this model's queries: {what}")


def _layer_parts(observation: Observation, layer: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """The decoder, the layer's block and its attention module."""
    model = observation.model
    decoder = model.get_decoder() if model is not None and hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "rotary_emb"):
        raise _refuse("it has no decoder layers with a rotary embedding (model.get_decoder().rotary_emb)")
    block = layers[layer]
    attention = getattr(block, "self_attn", None) or getattr(block, "attention", None)
    if attention is None:
        raise _refuse(f"layer {layer} has no self_attn module")
    return decoder, block, attention


@torch.no_grad()
def pre_rope_queries(observation: Observation, layer: int) -> torch.Tensor:
    """[H_q, N, d] fp32 queries before RoPE, recomputed from the layer's input hidden states the way the model's
    attention computes them: its input norm (pre-norm models), its query projection (q_proj, or the query part
    of a fused qkv_proj / query_key_value) and its query norm if it has one (reference_methods.md §0.6).
    `verified_rotation` checks the result against the queries the model really used."""
    if observation.hidden_states is None:
        raise ValueError("the prefill did not collect hidden states; declare hidden_states in needs()")
    _, block, attention = _layer_parts(observation, layer)
    h_q, d = observation.model.config.get_text_config().num_attention_heads, observation.head_dim
    x = observation.hidden_states[layer]
    n = x.shape[0]
    norm = getattr(block, "input_layernorm", None)
    if norm is not None:
        x = norm(x)
    if hasattr(attention, "q_proj"):
        queries = attention.q_proj(x)
    elif hasattr(attention, "qkv_proj"):
        queries = attention.qkv_proj(x)[..., : h_q * d]
    elif hasattr(attention, "query_key_value"):
        queries = attention.query_key_value(x).view(n, h_q, 3 * d)[..., :d].reshape(n, h_q * d)
    else:
        raise _refuse(f"{type(attention).__name__} has no q_proj, qkv_proj or query_key_value")
    q_norm = getattr(attention, "q_norm", None)
    if q_norm is not None and getattr(q_norm, "weight", None) is not None and q_norm.weight.dim() == 1:
        if q_norm.weight.numel() == queries.shape[-1]:  # a norm over all heads at once (OLMo2)
            queries = q_norm(queries)
            q_norm = None
    queries = queries.view(n, -1, d)
    if q_norm is not None:
        queries = q_norm(queries)
    return queries.transpose(0, 1).float()


def _cos_sin(observation: Observation, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary cos and sin at `positions` ([T, c] each) for this layer."""
    decoder, _, _ = _layer_parts(observation, layer)
    probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
    try:
        cos, sin = decoder.rotary_emb(probe, positions[None])
    except TypeError:  # per layer type (Gemma3: local and global RoPE)
        layer_type = observation.model.config.get_text_config().layer_types[layer]
        cos, sin = decoder.rotary_emb(probe, positions[None], layer_type)
    return cos[0].float(), sin[0].float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def _rotary(layout: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, d] rotated at T positions in one of the layouts transformers' models use: rotate-half on the
    first c channels (Llama; partial rotary when c < d), rotate-half with half-size cos/sin (GPT-OSS), rotated
    pairs (Cohere), or none (layers without positional embeddings, as Cohere2's global ones)."""
    if layout == "none":
        return x
    if layout == "half-size":
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    c = cos.shape[-1]
    turned, rest = x[..., :c], x[..., c:]
    rotate = _rotate_pairs if layout == "pairs" else _rotate_half
    return torch.cat([turned * cos + rotate(turned) * sin, rest], dim=-1)


LAYOUTS = ("rotate-half", "half-size", "pairs", "none")


@torch.no_grad()
def verified_rotation(observation: Observation, layer: int, queries: torch.Tensor) -> str:
    """The rotary layout under which the derived pre-RoPE `queries` [H_q, N, d] become the post-RoPE queries the
    model really used at the context's last positions (recorded through the attention function). Refused in one
    line when none does: scores from the wrong queries must not run."""
    recorded = observation.window_queries[layer].float() if observation.window_queries is not None else None
    if recorded is None or recorded.shape[1] == 0:
        raise ValueError("the prefill did not collect the last queries; declare window in needs()")
    n, w = observation.context_length, recorded.shape[1]
    positions = torch.arange(n - w, n, device=queries.device)
    cos, sin = _cos_sin(observation, layer, positions)
    derived = queries[:, n - w :]
    scale = recorded.norm() + 1e-12
    tolerance = 2e-2 if observation.keys[0].dtype in (torch.bfloat16, torch.float16) else 1e-3
    errors = {}
    for layout in LAYOUTS:
        if layout == "half-size" and 2 * cos.shape[-1] != derived.shape[-1]:
            continue
        errors[layout] = float((_rotary(layout, derived, cos, sin) - recorded).norm() / scale)
    layout = min(errors, key=errors.get)
    if errors[layout] > tolerance:
        raise _refuse(
            f"at layer {layer} the closest derivation is {errors[layout]:.1%} off the queries the model used "
            f"({type(_layer_parts(observation, layer)[2]).__name__})"
        )
    return layout


@torch.no_grad()
def averaged_rope(observation: Observation, start: int, count: int, layer: int = 0, layout: str = "rotate-half"):
    """R̄ [d, d]: the rotation averaged over positions start … start + count − 1 (q ↦ R̄ q), in the layer's
    verified layout: each R_t is the model's rotary applied to the identity."""
    d = observation.head_dim
    device = observation.keys[0].device
    positions = torch.arange(start, start + count, device=device)
    cos, sin = _cos_sin(observation, layer, positions)
    basis = torch.eye(d, device=device).expand(count, d, d)  # [T, i, :] = e_i at position t
    rotated = _rotary(layout, basis, cos[:, None, :], sin[:, None, :])  # [T, i, :] = R_t e_i
    return rotated.transpose(1, 2).mean(dim=0)


def expected_attention_scores(
    observation: Observation, layer: int, config: ExpectedAttentionConfig, n_kept: int
) -> torch.Tensor:
    """Expected attention of the next n_future_positions queries (× ‖v‖ with use_vnorm), group-averaged:
    [H_kv, N]; the sinks are protected (+inf). n_kept is unused (no budget-dependent protection), so the scores
    are computed once per (observation, layer, config): the cells of a sweep at several budgets, and adakv or
    adaptive_policy over this scorer, share them."""
    key = ("expected_attention_scores", layer, config)
    return observation.memoized(key, lambda: _expected_attention_scores(observation, layer, config))


def _expected_attention_scores(observation: Observation, layer: int, config: ExpectedAttentionConfig) -> torch.Tensor:
    n, h_kv = observation.context_length, observation.num_kv_heads
    keys = observation.keys[layer].float()
    scores = torch.full((h_kv, n), float("inf"), device=keys.device)
    sink = min(config.n_sink, n)
    if sink == n:
        return scores
    derived = pre_rope_queries(observation, layer)
    layout = verified_rotation(observation, layer, derived)
    queries = derived[:, sink:]
    rotation = averaged_rope(observation, n, config.n_future_positions, layer, layout)
    mean = queries.mean(dim=1)
    h_q, dim = mean.shape
    grouped_mean = (mean @ rotation.T).reshape(h_kv, h_q // h_kv, dim)
    scored = keys[:, sink:]
    logits = torch.einsum("hgd,hnd->hgn", grouped_mean, scored) * observation.scaling
    if config.use_covariance:
        centred = queries - queries.mean(dim=1, keepdim=True)
        covariance = centred.transpose(1, 2) @ centred / queries.shape[1]
        rotated = (rotation @ covariance @ rotation.T).reshape(h_kv, h_q // h_kv, dim, dim)
        quadratic = torch.einsum("hnd,hgde,hne->hgn", scored, rotated, scored)
        logits = logits + quadratic * observation.scaling**2 / 2
    expected = torch.softmax(logits, dim=-1).mean(dim=1)
    if config.use_vnorm:
        expected = (expected + config.epsilon) * observation.values[layer][:, sink:].float().norm(dim=-1)
    scores[:, sink:] = expected
    return scores


@register
class ExpectedAttention(Method):
    name = "expected_attention"
    family = "token eviction"
    description = "Keeps the tokens future queries are expected to attend to (query statistics, averaged RoPE), x |v|"
    Config = ExpectedAttentionConfig

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=CHECKED_POSITIONS, hidden_states=True)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n_kept = tokens_for_budget(observation.context_length, budget)
        return [
            keep_scored(observation, layer, expected_attention_scores(observation, layer, self.config, n_kept), n_kept)
            for layer in range(observation.num_layers)
        ]

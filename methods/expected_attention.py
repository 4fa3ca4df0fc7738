"""ExpectedAttention: keep the tokens future queries are expected to attend to, in closed form from the
context's query statistics (Devoto et al., arXiv 2510.00636; kvpress's ExpectedAttentionPress)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import KVBenchError
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
    the non-sink tokens and averaged over the query group. Σ is the population covariance of those queries
    (kvpress divides by N, including the sinks: a factor (N − n_sink)/N). The model's softmax scale stands in
    for 1/√d (equal on every model kvbench runs).
    """

    n_future_positions: int = option(512, at_least=1)
    n_sink: int = option(4, at_least=0)
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = option(0.0, at_least=0)


def _decoder(observation: Observation) -> torch.nn.Module:
    inner = getattr(observation.model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        raise KVBenchError(
            "expected_attention needs a decoder with rotary embeddings (model.model.rotary_emb and .layers, as in "
            "Llama, Qwen2, Mistral); this model has none"
        )
    return inner


@torch.no_grad()
def pre_rope_queries(observation: Observation, layer: int) -> torch.Tensor:
    """[H_q, N, d] fp32 queries before RoPE, recomputed from the layer's input hidden states: W_q · norm(x), with
    the model's q-norm if it has one (reference_methods.md §0.6)."""
    if observation.hidden_states is None:
        raise ValueError("the prefill did not collect hidden states; declare hidden_states in needs()")
    block = _decoder(observation).layers[layer]
    attention = block.self_attn
    x = block.input_layernorm(observation.hidden_states[layer])
    queries = attention.q_proj(x).view(x.shape[0], -1, observation.head_dim)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    return queries.transpose(0, 1).float()


@torch.no_grad()
def averaged_rope(observation: Observation, start: int, count: int) -> torch.Tensor:
    """R̄ [d, d]: the RoPE rotation averaged over positions start … start + count − 1, in the rotate-half
    layout transformers uses (R_t = diag(cos_t) + diag(sin_t)·P, P q = (−q₂, q₁))."""
    d = observation.head_dim
    device = observation.keys[0].device
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    positions = torch.arange(start, start + count, device=device)[None]
    cos, sin = _decoder(observation).rotary_emb(probe, positions)
    half = d // 2
    p = torch.zeros(d, d, device=device)
    p[half:, :half] = torch.eye(half, device=device)
    p[:half, half:] = -torch.eye(half, device=device)
    eye = torch.eye(d, device=device)
    rotations = cos[0].float()[:, :, None] * eye + sin[0].float()[:, :, None] * p
    return rotations.mean(dim=0)


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
    queries = pre_rope_queries(observation, layer)[:, sink:]
    rotation = averaged_rope(observation, n, config.n_future_positions)
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
        return ObservationNeeds(hidden_states=True)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n_kept = tokens_for_budget(observation.context_length, budget)
        return [
            keep_scored(observation, layer, expected_attention_scores(observation, layer, self.config, n_kept), n_kept)
            for layer in range(observation.num_layers)
        ]

"""Token features and the per-head scorer of the Lightweight method (seed 004, seed_methods.md (d)).

One feature vector per (layer, KV head, token), F = the sum of the selected features' dims:

| feature | dims | here |
|---|---|---|
| attn_score | 1 | s_j = Σ_{i≥j} (i+1)·A[i,j]/(T−j), A averaged over the query group; while decoding the running mean
  s ← (s·n + a_t·(t+1))/(n+1), n = t − pos_j: the same estimator, so a token scores the same whether its queries
  came in the prefill or one by one (`prefill_attn_score`, `update_attn_score`) |
| vector_norm | 4 | ‖k‖, ‖v‖, ‖q̄‖ (post-RoPE, q̄ the mean query of the KV head's group), ‖x‖ (the layer's input hidden
  state, the residual stream before the layer's norm) |
| vector_cv | 4 | std/mean over the channels of the same four vectors (population std; |mean| < 1e-6 → 1e-6) |
| vector_z_score | 4 | (max − mean)/std over the channels (std < 1e-6 → 1e-6) |
| token_profiling | 2 | special-token flag, punctuation flag, looked up in a table made from the tokenizer once |
| normalized_pos | 1 | pos / t, t the newest position (1 where t = 0) |
| convolution | per vector | Conv1d(1→C_h, k1, stride k1) → ReLU → Conv1d(C_h→1, k2, stride k2) over k, v, q̄ and x, output
  dims = the divisor of the vector's length nearest 6 (≥ 3, ties to the smaller: 4 for d = 64 or 128), min-max
  normalised per token; trainable, one per (layer, KV head, vector) like the scorer |

attn_score and normalized_pos change while decoding (`DYNAMIC`); the others are fixed once a token is in the
cache, so the decode state stores them per kept token instead of the queries and hidden states they come from.
The feature vector is laid out as [attn_score, normalized_pos, static features in `FEATURES` order], each part
present only when selected.
"""

from __future__ import annotations

import json
import math
import string
import unicodedata
from functools import partial

import torch

from kvbench.harness.errors import KVBenchError
from kvbench.methods.common.eviction import decode_attention, group_mean

FEATURES = (
    "attn_score",
    "vector_norm",
    "vector_cv",
    "vector_z_score",
    "token_profiling",
    "normalized_pos",
    "convolution",
)
DYNAMIC = ("attn_score", "normalized_pos")
VECTOR_FEATURES = ("vector_norm", "vector_cv", "vector_z_score", "convolution")
VECTORS = ("k", "v", "q", "x")
SCORERS = ("linear", "mlp")
GUARD = 1e-6
# Every context query is needed (attn_score and q̄ of every token); the prefill clamps the window to N.
ALL_QUERIES = 2**62
# Query rows per chunk of the prefill's attention, so the N×N matrix is never materialised.
_CHUNK = 256


def check_features(features: tuple[str, ...]) -> tuple[str, ...]:
    """The selected features, validated; an unknown, repeated or empty selection is one line."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features or len(set(features)) != len(features):
        raise KVBenchError(
            f"lightweight features must be distinct names among {', '.join(FEATURES)}, not {', '.join(features) or 'none'}"
        )
    return tuple(f for f in FEATURES if f in features)


def needs_vectors(features: tuple[str, ...]) -> bool:
    """Whether q̄ and x are needed (any vector feature)."""
    return any(f in features for f in VECTOR_FEATURES)


def convolution_out(length: int) -> int:
    """Output dims of the double convolution over a vector of `length` channels: its divisor nearest 6 (≥ 3)."""
    divisors = [k for k in range(3, length + 1) if length % k == 0] or [length]
    return min(divisors, key=lambda k: (abs(k - 6), k))


def convolution_kernels(length: int) -> tuple[int, int]:
    """(k1, k2) with k1·k2 = length / output dims, k1 the largest divisor not above the square root."""
    stride = length // convolution_out(length)
    k1 = max(k for k in range(1, math.isqrt(stride) + 1) if stride % k == 0)
    return k1, stride // k1


def feature_dim(features: tuple[str, ...], head_dim: int, hidden: int) -> int:
    dims = {"attn_score": 1, "vector_norm": 4, "vector_cv": 4, "vector_z_score": 4, "token_profiling": 2}
    dims["normalized_pos"] = 1
    dims["convolution"] = 3 * convolution_out(head_dim) + convolution_out(hidden)
    return sum(dims[f] for f in features)


def static_dim(features: tuple[str, ...], head_dim: int, hidden: int) -> int:
    return feature_dim(tuple(f for f in features if f not in DYNAMIC), head_dim, hidden)


# --- attention received --------------------------------------------------------------------------------------


def prefill_attn_score(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """s_j = Σ_{i≥j} (i+1)·A[i,j] / (T−j), A the causal attention averaged over the query group:
    queries [H_q, T, d], keys [H_kv, T, d] (post-RoPE) → [H_kv, T] fp32, in chunks of query rows."""
    h_kv, n = keys.shape[0], keys.shape[1]
    total = torch.zeros(h_kv, n, dtype=torch.float32, device=keys.device)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        attention = decode_attention(queries[:, start:stop], keys[:, :stop], scaling).mean(dim=1)
        visible = torch.arange(start + 1, stop + 1, dtype=torch.float32, device=keys.device)
        total[:, :stop] += (attention * visible[None, :, None]).sum(dim=1)
    return total / torch.arange(n, 0, -1, dtype=torch.float32, device=keys.device)


def update_attn_score(
    score: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor, row_positions: list[int]
) -> torch.Tensor:
    """The running mean s ← (s·n + a_t·(t+1))/(n+1), n = t − pos_j, for each new query row t in order:
    score [H, n] (0 for tokens no query has seen yet), positions [H, n], attention [H, m, n] (group mean)."""
    score = score.clone()
    for row, t in enumerate(row_positions):
        seen = (t - positions).to(torch.float32)
        updated = (score * seen + attention[:, row] * (t + 1)) / (seen + 1)
        score = torch.where(positions <= t, updated, score)
    return score


# --- vector statistics ---------------------------------------------------------------------------------------


def vector_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norm, coefficient of variation and z-score of the max over the last dim, guarded against zero: [...]."""
    x = x.float()
    mean = x.mean(dim=-1)
    std = x.std(dim=-1, unbiased=False)
    return {
        "vector_norm": x.norm(dim=-1),
        "vector_cv": std / torch.where(mean.abs() < GUARD, torch.full_like(mean, GUARD), mean),
        "vector_z_score": (x.max(dim=-1).values - mean) / std.clamp(min=GUARD),
    }


def token_flags(tokenizer, vocab_size: int) -> torch.Tensor:
    """[V, 2] fp32: (special token, punctuation) per id. Punctuation: the token's text, stripped, is non-empty
    and every character is ASCII or Unicode punctuation."""
    size = max(vocab_size, len(tokenizer))
    flags = torch.zeros(size, 2)
    special = set(int(i) for i in tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        if token_id in special:
            flags[token_id, 0] = 1.0
            continue
        text = tokenizer.decode([token_id]).strip()
        if text and all(c in string.punctuation or unicodedata.category(c).startswith("P") for c in text):
            flags[token_id, 1] = 1.0
    return flags


# --- trainable parts -----------------------------------------------------------------------------------------


def _normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=generator) * 0.02)


class DoubleConvolution(torch.nn.Module):
    """Conv1d(1→C_h, k1, stride k1) → ReLU → Conv1d(C_h→1, k2, stride k2), one per (layer, KV head), over vectors
    of `length` channels; output min-max normalised per token. Strides equal kernels, so each conv is a reshape
    and a contraction."""

    def __init__(self, layers: int, heads: int, length: int, channels: int, generator: torch.Generator):
        super().__init__()
        self.k1, self.k2 = convolution_kernels(length)
        self.w1 = _normal((layers, heads, channels, self.k1), generator)
        self.b1 = torch.nn.Parameter(torch.zeros(layers, heads, channels))
        self.w2 = _normal((layers, heads, channels, self.k2), generator)
        self.b2 = torch.nn.Parameter(torch.zeros(layers, heads))

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [H, n, length] → [H, n, out]."""
        h, n, length = x.shape
        blocks = x.float().reshape(h, n, length // self.k1, self.k1)
        hidden = torch.relu(torch.einsum("hnbk,hck->hnbc", blocks, self.w1[layer]) + self.b1[layer][:, None, None])
        grouped = hidden.reshape(h, n, -1, self.k2, hidden.shape[-1])
        out = torch.einsum("hnokc,hck->hno", grouped, self.w2[layer]) + self.b2[layer][:, None, None]
        low, high = out.min(dim=-1, keepdim=True).values, out.max(dim=-1, keepdim=True).values
        span = high - low
        return torch.where(span < GUARD, torch.zeros_like(out), (out - low) / span.clamp(min=GUARD))


class Scorer(torch.nn.Module):
    """Per (layer, KV head): linear F→1, or MLP F→2F→ReLU→1; weights N(0, 0.02), biases 0 (the seed's init);
    plus the double convolutions when that feature is selected.

    standardize: the network reads (f − shift) · scale instead of the raw features f, with per (layer, KV head,
    feature) buffers that training sets from its training split and the checkpoint carries;
    the identity until then. kvbench's addition, not the seed's (LightweightConfig says why)."""

    def __init__(
        self,
        kind: str,
        features: tuple[str, ...],
        layers: int,
        heads: int,
        head_dim: int,
        hidden: int,
        channels: int,
        seed: int,
        standardize: bool = False,
    ):
        super().__init__()
        if kind not in SCORERS:
            raise KVBenchError(f"lightweight's scorer must be one of {', '.join(SCORERS)}, not {kind!r}")
        generator = torch.Generator().manual_seed(seed)
        self.kind, self.features = kind, features
        width = feature_dim(features, head_dim, hidden)
        if kind == "linear":
            self.weight = _normal((layers, heads, width), generator)
            self.bias = torch.nn.Parameter(torch.zeros(layers, heads))
        else:
            self.w1 = _normal((layers, heads, width, 2 * width), generator)
            self.b1 = torch.nn.Parameter(torch.zeros(layers, heads, 2 * width))
            self.w2 = _normal((layers, heads, 2 * width), generator)
            self.b2 = torch.nn.Parameter(torch.zeros(layers, heads))
        self.standardize = standardize
        # The features before the convolutions' outputs (which `assemble` puts last).
        self.plain_width = feature_dim(tuple(f for f in features if f != "convolution"), head_dim, hidden)
        if standardize:
            self.register_buffer("shift", torch.zeros(layers, heads, width))
            self.register_buffer("scale", torch.ones(layers, heads, width))
        self.convolutions = torch.nn.ModuleDict()
        if "convolution" in features:
            for name in VECTORS:
                length = hidden if name == "x" else head_dim
                self.convolutions[name] = DoubleConvolution(layers, heads, length, channels, generator)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """features [H, n, F] → scores [H, n] (higher = keep)."""
        if self.standardize:
            features = (features - self.shift[layer][:, None]) * self.scale[layer][:, None]
        if self.kind == "linear":
            return torch.einsum("hnf,hf->hn", features, self.weight[layer]) + self.bias[layer][:, None]
        hidden = torch.relu(torch.einsum("hnf,hfk->hnk", features, self.w1[layer]) + self.b1[layer][:, None])
        return torch.einsum("hnk,hk->hn", hidden, self.w2[layer]) + self.b2[layer][:, None]


def token_vectors(
    keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, hidden: torch.Tensor
) -> dict[str, torch.Tensor]:
    """k, v, q̄ (group-mean query) and x (broadcast to every head) of each token, fp32 [H, n, ·]."""
    h = keys.shape[0]
    return {
        "k": keys.float(),
        "v": values.float(),
        "q": group_mean(queries.float(), h),
        "x": hidden.float()[None].expand(h, -1, -1),
    }


def fixed_features(
    features: tuple[str, ...], vectors: dict[str, torch.Tensor], flags: torch.Tensor | None, heads: int
) -> torch.Tensor | None:
    """The static features without parameters (vector statistics, token flags): [H, n, ·] or None."""
    parts = []
    for name in ("vector_norm", "vector_cv", "vector_z_score"):
        if name in features:
            parts.append(torch.stack([vector_stats(vectors[v])[name] for v in VECTORS], dim=-1))
    if "token_profiling" in features:
        parts.append(flags.float()[None].expand(heads, -1, -1))
    return torch.cat(parts, dim=-1) if parts else None


def convolution_features(scorer: Scorer, layer: int, vectors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The trainable double convolutions over k, v, q̄ and x: [H, n, ·] or None when not selected."""
    if "convolution" not in scorer.features:
        return None
    return torch.cat([scorer.convolutions[v](layer, vectors[v]) for v in VECTORS], dim=-1)


def join(*parts: torch.Tensor | None) -> torch.Tensor | None:
    present = [p for p in parts if p is not None]
    return torch.cat(present, dim=-1) if present else None


def static_features(
    scorer: Scorer,
    layer: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor | None,
    hidden: torch.Tensor | None,
    flags: torch.Tensor | None,
) -> torch.Tensor | None:
    """The features fixed once a token is cached, [H, n, F_static] fp32 (None when none is selected), in
    `FEATURES` order: keys/values [H, n, d], queries [H_q, n, d] (post-RoPE, their own positions), hidden [n, D],
    flags [n, 2]."""
    vectors = token_vectors(keys, values, queries, hidden) if needs_vectors(scorer.features) else {}
    fixed = fixed_features(scorer.features, vectors, flags, keys.shape[0])
    return join(fixed, convolution_features(scorer, layer, vectors))


def assemble(
    features: tuple[str, ...],
    attn: torch.Tensor | None,
    positions: torch.Tensor,
    newest: int,
    static: torch.Tensor | None,
) -> torch.Tensor:
    """[H, n, F]: attn_score, normalized_pos (pos / newest position), then the static features."""
    parts = []
    if "attn_score" in features:
        parts.append(attn[..., None])
    if "normalized_pos" in features:
        parts.append((positions.float() / max(newest, 1))[..., None])
    if static is not None:
        parts.append(static)
    return torch.cat(parts, dim=-1)


def protected_positions(positions: torch.Tensor, length: int, global_tokens: int, recent_window: int) -> torch.Tensor:
    """Where a token is never evicted: its position is among the first `global_tokens` or the last
    `recent_window` of the `length` positions seen (the newest always)."""
    return (positions < global_tokens) | (positions >= length - max(recent_window, 1))


def encode_layout(record: dict) -> torch.Tensor:
    """A JSON record as a uint8 tensor, so the checkpoint's weights carry their own feature configuration."""
    return torch.tensor(list(json.dumps(record, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode_layout(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


def parse_features(text: str) -> tuple[str, ...]:
    """A comma-separated selection ('all' for every feature), in `FEATURES` order."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    return FEATURES if names == ("all",) else check_features(names)


def observed_inputs(
    features: tuple[str, ...], observation, layer: int, flags: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(queries [H_q, N, d], hidden [N, D], token flags [N, 2]) of one layer's context, each None where no
    selected feature needs it. The observation must hold every context query (window = N) when attn_score or a
    vector feature is selected, and the hidden states for a vector feature."""
    n = observation.keys[layer].shape[1]
    queries = hidden = token = None
    if "attn_score" in features or needs_vectors(features):
        queries = observation.window_queries[layer] if observation.window_queries is not None else None
        if queries is None or queries.shape[1] != n:
            raise ValueError("lightweight needs every context query from the prefill; declare window=N in needs()")
    if needs_vectors(features):
        if observation.hidden_states is None:
            raise ValueError("lightweight needs the prefill's hidden states; declare hidden_states in needs()")
        hidden = observation.hidden_states[layer]
    if "token_profiling" in features:
        token = flags[observation.input_ids.cpu()].to(observation.keys[layer].device)
    return queries, hidden, token


def prefill_layer_features(
    scorer: Scorer, observation, layer: int, flags: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """One layer's features from the prefill's observation: (attn_score [H, N] or None, static [H, N, F_s] or
    None, all features [H, N, F])."""
    features = scorer.features
    keys, values = observation.keys[layer], observation.values[layer]
    n = keys.shape[1]
    queries, hidden, token = observed_inputs(features, observation, layer, flags)
    attn = None
    if "attn_score" in features:
        # O(N²) and independent of the scorer and the budget: computed once per (observation, layer), shared by
        # the cells of a sweep at several budgets and by every lightweight scorer compressing this observation.
        compute = partial(prefill_attn_score, queries, keys, observation.scaling)
        attn = observation.memoized(("lightweight_attn_score", layer), compute)
    static = static_features(scorer, layer, keys, values, queries, hidden, token)
    positions = torch.arange(n, device=keys.device).expand(keys.shape[0], -1)
    return attn, static, assemble(features, attn, positions, n - 1, static)

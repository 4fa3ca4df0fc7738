"""What the learned per-head budget policy (seed_methods.md (b)) computes the same way in training and at
inference: a KV head's statistics and its 52 features, the policy network, water-filling over one layer's heads,
the integer budgets, and the coverage of a budget.

Training and `adaptive_policy.compress` both call `water_fill` with one layer's heads as the scope and the same
C_min: the seed softmaxed over all L·H heads in training and per layer at inference (and used C_min 0 vs 1), so
what it trained was not what it ran.
"""

from __future__ import annotations

import torch

from kvbench.methods.common.eviction import top_indices

# Raised whenever a feature's definition changes: a checkpoint made with other features is refused.
FEATURE_VERSION = 1
PROJECTION = 8
SEGMENTS = 8
# Scalars after the four d-vectors: mean ‖k‖, mean ‖v‖, 8 segment norms of K, of V, layer and head position.
SCALARS = 2 + 2 * SEGMENTS + 2
FEATURES = 4 * PROJECTION + SCALARS  # 52


def feature_record(head_dim: int, num_layers: int, num_kv_heads: int) -> dict:
    """What a checkpoint's policy expects of its inputs; another record is another model or other features."""
    return {
        "version": FEATURE_VERSION,
        "features": FEATURES,
        "projection": PROJECTION,
        "segments": SEGMENTS,
        "head_dim": head_dim,
        "layers": num_layers,
        "kv_heads": num_kv_heads,
    }


def head_statistics(keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> torch.Tensor:
    """[H, 4d + 20] per KV head of one layer, from its cached (post-RoPE) keys and values [H, T, d]: token-mean K,
    token-mean V, per-channel variance of K, of V (population), mean ‖k_t‖₂, mean ‖v_t‖₂, ‖mean K_seg‖₂ and
    ‖mean V_seg‖₂ of 8 near-equal consecutive segments (sizes differ by at most one token; an empty segment of a
    context shorter than 8 tokens gives 0), l/(L−1) and h/(H−1) (0 where there is one).

    Only the context's own tokens are read: each text is prefilled alone, so there is no padding to leak in."""
    k, v = keys.float(), values.float()
    heads, length, _ = k.shape

    def segment_norms(x: torch.Tensor) -> torch.Tensor:
        parts = torch.tensor_split(x, SEGMENTS, dim=1)
        return torch.stack([p.mean(dim=1).norm(dim=-1) if p.shape[1] else x.new_zeros(heads) for p in parts], dim=-1)

    layer_position = torch.full((heads, 1), layer / (num_layers - 1) if num_layers > 1 else 0.0, device=k.device)
    head_position = (torch.arange(heads, device=k.device, dtype=torch.float32) / max(heads - 1, 1))[:, None]
    return torch.cat(
        [
            k.mean(dim=1),
            v.mean(dim=1),
            k.var(dim=1, unbiased=False),
            v.var(dim=1, unbiased=False),
            k.norm(dim=-1).mean(dim=1, keepdim=True),
            v.norm(dim=-1).mean(dim=1, keepdim=True),
            segment_norms(k),
            segment_norms(v),
            layer_position,
            head_position,
        ],
        dim=-1,
    )


def context_statistics(keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """[L, H, 4d + 20]: `head_statistics` of every layer."""
    return torch.stack([head_statistics(k, v, layer, len(keys)) for layer, (k, v) in enumerate(zip(keys, values))])


class BudgetPolicy(torch.nn.Module):
    """Statistics → the 52 features (trainable Linear(d→8) of mean K, mean V, var K, var V; the 20 scalars as
    they are) → Linear(52→hidden) → GELU → Linear(hidden→1): one logit α per head, shared by all heads and layers.

    The statistics are standardized with per-entry means and deviations of the training split (`loc`, `scale`,
    saved with the weights) before anything else: key variances run into the hundreds while positions lie in
    [0, 1], and AdamW over a few hundred steps does not undo such scales. It is an affine reparametrisation
    of the same 52 features, not another feature.
    """

    def __init__(self, head_dim: int, hidden: int):
        super().__init__()
        self.head_dim = head_dim
        self.mean_keys = torch.nn.Linear(head_dim, PROJECTION)
        self.mean_values = torch.nn.Linear(head_dim, PROJECTION)
        self.variance_keys = torch.nn.Linear(head_dim, PROJECTION)
        self.variance_values = torch.nn.Linear(head_dim, PROJECTION)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
        self.register_buffer("loc", torch.zeros(4 * head_dim + SCALARS))
        self.register_buffer("scale", torch.ones(4 * head_dim + SCALARS))

    @torch.no_grad()
    def standardize_on(self, statistics: torch.Tensor) -> None:
        """Fit `loc` and `scale` to statistics [..., 4d + 20] of the training split (every layer, head, text)."""
        flat = statistics.reshape(-1, statistics.shape[-1]).float()
        self.loc.copy_(flat.mean(dim=0))
        self.scale.copy_(flat.std(dim=0, unbiased=False).clamp_min(1e-6))

    def features(self, statistics: torch.Tensor) -> torch.Tensor:
        """[..., 52] from statistics [..., 4d + 20]."""
        x = (statistics - self.loc) / self.scale
        d = self.head_dim
        return torch.cat(
            [
                self.mean_keys(x[..., :d]),
                self.mean_values(x[..., d : 2 * d]),
                self.variance_keys(x[..., 2 * d : 3 * d]),
                self.variance_values(x[..., 3 * d : 4 * d]),
                x[..., 4 * d :],
            ],
            dim=-1,
        )

    def forward(self, statistics: torch.Tensor) -> torch.Tensor:
        """α [...]: one logit per head."""
        return self.mlp(self.features(statistics))[..., 0]


def water_fill(alpha: torch.Tensor, length: int, total: float | torch.Tensor, c_min: int) -> torch.Tensor:
    """Continuous budgets C [..., S] of the S heads of one scope (the last dimension: one layer's KV heads).

    w = softmax(α); C_h = C_min + w_h·(B − S·C_min); heads above `length` are clipped to it and what they gave
    up goes to the others in proportion to w, until none exceeds it. So Σ C_h = B, C_min ≤ C_h ≤ length, and
    C_h = min(length, C_min + λ·w_h) for one λ per scope. Differentiable in α (clipped heads carry no gradient).
    Needs S·C_min ≤ B ≤ S·length."""
    weights = torch.softmax(alpha.float(), dim=-1)
    heads = alpha.shape[-1]
    total = torch.as_tensor(total, dtype=weights.dtype, device=weights.device)
    total = total.expand(alpha.shape[:-1])[..., None]
    clipped = torch.zeros_like(weights, dtype=torch.bool)
    for _ in range(heads + 1):
        free = ~clipped
        room = total - length * clipped.sum(dim=-1, keepdim=True) - c_min * free.sum(dim=-1, keepdim=True)
        share = torch.where(free, weights, 0.0)
        share = share / share.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        budgets = torch.where(clipped, torch.full_like(weights, float(length)), c_min + share * room)
        over = free & (budgets > length)
        if not bool(over.any()):
            return budgets
        clipped = clipped | over
    return budgets


def integer_budgets(budgets: torch.Tensor, total: int, length: int, c_min: int) -> list[int]:
    """Whole token counts of one scope's continuous budgets [S] that sum to exactly `total`: each head gets
    ⌊C_h⌋, then the heads with the largest remainders one more (largest-remainder rounding), within
    [C_min, length]; so no head is more than one token from its C_h."""
    continuous = budgets.detach().double().cpu()
    counts = continuous.floor().clamp(c_min, length).long()
    remainder = continuous - counts
    short = total - int(counts.sum())
    if short > 0:
        order = [h for h in remainder.argsort(descending=True).tolist() if counts[h] < length]
        for h in order[:short]:
            counts[h] += 1
    elif short < 0:
        order = [h for h in remainder.argsort().tolist() if counts[h] > c_min]
        for h in order[:-short]:
            counts[h] -= 1
    if int(counts.sum()) != total:
        raise ValueError(f"cannot split {total} tokens over {len(counts)} heads within [{c_min}, {length}]")
    return counts.tolist()


def head_budgets(alpha: torch.Tensor, length: int, total: int, c_min: int) -> list[int]:
    """One layer's token counts per head from its logits [H]: water-filling, then whole tokens summing to `total`.
    The one allocation both the held-out evaluation and `adaptive_policy.compress` use."""
    return integer_budgets(water_fill(alpha, length, float(total), c_min), total, length, c_min)


def select_per_head(scores: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Each head's top-k_h tokens of a scorer's [H, N] scores (protected tokens first, see `top_indices`)."""
    return [top_indices(scores[h : h + 1], k)[0] for h, k in enumerate(counts)]


def sorted_coverage(mass: torch.Tensor) -> torch.Tensor:
    """g [..., T + 1]: g(j) is the share of a head's attention mass u [..., T] on its j most attended tokens:
    û = max(u, 0)/(Σ_t u + 1e-8), sorted descending, cumulated, g(0) = 0."""
    share = mass.clamp_min(0) / (mass.sum(dim=-1, keepdim=True) + 1e-8)
    cumulative = share.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative], dim=-1)


def coverage(curve: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """g at continuous budgets C [...] by linear interpolation (k* = clamp(C, 0, T − 1e-6)), curves [..., T + 1];
    the gradient in C is the share of the token ranked ⌊k*⌋ + 1."""
    length = curve.shape[-1] - 1
    k = budgets.clamp(0, length - 1e-6)
    low = k.detach().floor().long().clamp(max=length - 1)
    below = curve.gather(-1, low[..., None])[..., 0]
    above = curve.gather(-1, (low + 1)[..., None])[..., 0]
    return below + (k - low) * (above - below)

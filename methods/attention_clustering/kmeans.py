"""Merging stored entries into K centroid pairs per KV head, as seed 003 does (specs/seed_methods.md (c)).

Entries carry a count: how many context tokens each stands for (1 for a raw token, the member total for a
centroid of an earlier merge). Weighting by count makes merging a merged token the same as merging the
tokens it replaced, and the count becomes the ln(count) logit bias of the new centroid.

Everything is batched over KV heads ([H, n, d]) but never mixes them: each head has its own centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CENTROID_RULES = ("online", "batch_mean")


@dataclass
class Merged:
    """K centroid pairs per KV head and the number of context tokens each stands for."""

    keys: torch.Tensor  # [H, K, d]
    values: torch.Tensor  # [H, K, d]
    counts: torch.Tensor  # [H, K] int64


def assign(keys: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Nearest seed key (Euclidean) of every key: [H, n] cluster ids, the seed entries `seeds` ([K]) as centres.

    A seed entry always joins its own cluster: it is at distance 0 from it, but a tie or rounding in the
    distance could otherwise leave a cluster empty, with a bias of ln 0.
    """
    with torch.no_grad():  # an assignment: nothing to differentiate when a model is trained through merging
        clusters = torch.cdist(keys.float(), keys[:, seeds].float()).argmin(dim=-1)
    clusters[:, seeds] = torch.arange(seeds.numel(), device=keys.device)
    return clusters


class _Groups:
    """Cluster membership flattened over heads (cluster id h·K + c), with each cluster's total count."""

    def __init__(self, clusters: torch.Tensor, counts: torch.Tensor, k: int):
        h = clusters.shape[0]
        self.shape = (h, k)
        self.ids = (clusters + torch.arange(h, device=clusters.device)[:, None] * k).reshape(-1)
        self.weights = counts.reshape(-1).double()
        self.totals = torch.zeros(h * k, dtype=torch.float64, device=counts.device).index_add_(
            0, self.ids, self.weights
        )


def _online(vectors: torch.Tensor, groups: _Groups, start: torch.Tensor, rate: float) -> torch.Tensor:
    """μ_c ← (1−η)·μ_c + η·x_i over the members of c in entry order, an entry of count w applied w times.

    The sequence has a closed form, μ_c = (1−η)^{W_c}·μ_c⁰ + Σ_i (1−(1−η)^{w_i})·(1−η)^{A_i}·x_i, with W_c the
    count of c and A_i the count of c's members after i; it replaces a Python loop over every entry.
    """
    d = vectors.shape[-1]
    order = torch.argsort(groups.ids, stable=True)
    sorted_ids, sorted_w = groups.ids[order], groups.weights[order]
    earlier_clusters = torch.cumsum(groups.totals, 0) - groups.totals
    up_to_and_including = torch.cumsum(sorted_w, 0) - earlier_clusters[sorted_ids]
    after = groups.totals[sorted_ids] - up_to_and_including
    log_keep = torch.log1p(torch.tensor(-rate, dtype=torch.float64))
    coefficients = torch.empty_like(groups.weights)
    coefficients[order] = -torch.expm1(sorted_w * log_keep) * torch.exp(after * log_keep)
    merged = start.reshape(-1, d).float() * torch.exp(groups.totals * log_keep).float()[:, None]
    merged.index_add_(0, groups.ids, coefficients.float()[:, None] * vectors.reshape(-1, d).float())
    return merged.reshape(*groups.shape, d).to(vectors.dtype)


def _batch_mean(vectors: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """Count-weighted mean of each cluster's members."""
    d = vectors.shape[-1]
    sums = torch.zeros(groups.totals.numel(), d, dtype=torch.float32, device=vectors.device)
    sums.index_add_(0, groups.ids, groups.weights.float()[:, None] * vectors.reshape(-1, d).float())
    return (sums / groups.totals.float()[:, None]).reshape(*groups.shape, d).to(vectors.dtype)


def merge(
    keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, seeds: torch.Tensor, rule: str, rate: float
) -> Merged:
    """Merge each head's n entries into K = len(seeds) centroid pairs, seeded at the entries `seeds`.

    Assignment uses keys only; values follow the same assignment. `rule` is "online" (the paper's update
    with rate η, starting from the seed entry) or "batch_mean" (the count-weighted mean of the members).
    """
    groups = _Groups(assign(keys, seeds), counts, seeds.numel())
    if rule == "online":
        merged_keys = _online(keys, groups, keys[:, seeds], rate)
        merged_values = _online(values, groups, values[:, seeds], rate)
    elif rule == "batch_mean":
        merged_keys, merged_values = _batch_mean(keys, groups), _batch_mean(values, groups)
    else:
        raise ValueError(f"unknown centroid rule {rule!r}; use one of {', '.join(CENTROID_RULES)}")
    return Merged(merged_keys, merged_values, groups.totals.round().to(torch.int64).reshape(groups.shape))

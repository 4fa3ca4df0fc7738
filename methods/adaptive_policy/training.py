"""Training of the per-head budget policy (seed_methods.md (b)): teacher dump, coverage loss, AdamW, and the
held-out coverage of learned, uniform and AdaKV allocation.

Teacher dump: one prefill per text (each alone, so nothing is padded); per layer and KV head, u[t] = attention
mass the last t_q queries put on token t (Σ over those queries, mean over the head's query group), computed from
those t_q query rows over all keys (never an N×N matrix). What is kept per text is what the loss and the features
read: the statistics the 52 features are made of ([L, H, 4d + 20]; K and V themselves are not needed once they are
summarised) and the sorted, cumulated shares g [L, H, T + 1]. Held-out texts also keep û and the base scorer's
scores, for the table.

Loss (self-supervised, the LLM not in the loop): per text, c ~ U(0.2, 0.8); α = policy(features); per layer,
C = water_fill(α, T, c·T·H, C_min); loss = mean over all heads of 1 − g_h(C_h) (linear interpolation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvbench.harness.artifacts.training import progress
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, prefill
from kvbench.methods.adaptive_policy.features import (
    BudgetPolicy,
    context_statistics,
    coverage,
    head_budgets,
    select_per_head,
    sorted_coverage,
    water_fill,
)
from kvbench.methods.common.eviction import (
    adaptive_indices,
    group_mean,
    tokens_for_budget,
    top_indices,
    window_attention,
)
from kvbench.methods.common.scorers import Scorer

# Kept fractions of the held-out table (the budgets), and the grid standing in for U(0.2, 0.8) when a
# loss is measured rather than trained on.
TABLE_FRACTIONS = (0.1, 0.25, 0.5)
LOSS_GRID = tuple(0.2 + 0.1 * i for i in range(7))
ALLOCATIONS = ("learned", "uniform", "adakv")


@dataclass
class TeacherSample:
    """One text's teacher data: statistics [L, H, 4d + 20] and coverage curves g [L, H, T + 1]; held-out texts
    also keep the shares û [L, H, T] and, per table fraction, the base scorer's scores [L, H, T]."""

    statistics: torch.Tensor
    curves: torch.Tensor
    shares: torch.Tensor | None = None
    scores: dict[float, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        return int(self.curves.shape[-1]) - 1


def teacher_mass(observation: Observation, layer: int, t_q: int) -> torch.Tensor:
    """u [H_kv, N]: Σ over the last min(t_q, N) queries of their attention on each token, mean over the query
    group. Each query row sums to 1, so Σ_t u = that number of queries."""
    rows = min(t_q, observation.context_length)
    return group_mean(window_attention(observation, layer, rows).sum(dim=1), observation.num_kv_heads)


@torch.no_grad()
def dump(model: torch.nn.Module, windows: list[list[int]], t_q: int, scorer: Scorer | None, desc: str):
    """Teacher samples of the texts; with a scorer (held-out), its scores too, so the prefill collects its needs."""
    needs = ObservationNeeds(window=t_q)
    if scorer is not None:
        needs = needs.union(scorer.needs())
    samples = []
    for ids in progress(windows, desc=desc):
        observation = prefill(model, ids, needs)
        mass = torch.stack([teacher_mass(observation, layer, t_q) for layer in range(observation.num_layers)])
        sample = TeacherSample(
            context_statistics(observation.keys, observation.values).cpu(), sorted_coverage(mass).cpu()
        )
        if scorer is not None:
            sample.shares = (mass.clamp_min(0) / (mass.sum(dim=-1, keepdim=True) + 1e-8)).cpu()
            n = observation.context_length
            sample.scores = {
                c: torch.stack(
                    [
                        scorer.scores(observation, layer, tokens_for_budget(n, c)).float().cpu()
                        for layer in range(observation.num_layers)
                    ]
                )
                for c in TABLE_FRACTIONS
            }
        samples.append(sample)
    return samples


def coverage_loss(policy: BudgetPolicy, sample: TeacherSample, fraction: float, c_min: int) -> torch.Tensor:
    """mean over every head of 1 − coverage, with each layer's heads sharing c·T·H tokens (scope: one layer)."""
    alpha = policy(sample.statistics)
    heads = alpha.shape[-1]
    budgets = water_fill(alpha, sample.length, fraction * sample.length * heads, c_min)
    return (1 - coverage(sample.curves, budgets)).mean()


def uniform_loss(sample: TeacherSample, fraction: float) -> torch.Tensor:
    budgets = torch.full(sample.curves.shape[:-1], fraction * sample.length)
    return (1 - coverage(sample.curves, budgets)).mean()


@torch.no_grad()
def mean_loss(policy: BudgetPolicy | None, samples: list[TeacherSample], c_min: int) -> float:
    """The loss averaged over the texts and the grid LOSS_GRID (uniform allocation where `policy` is None)."""
    losses = [
        float(uniform_loss(s, c) if policy is None else coverage_loss(policy, s, c, c_min))
        for s in samples
        for c in LOSS_GRID
    ]
    return sum(losses) / len(losses)


def train_policy(
    policy: BudgetPolicy, samples: list[TeacherSample], options, desc: str = "kvbench: train adaptive_policy"
) -> list[float]:
    """AdamW over the projections and the MLP, one text per step, c drawn per step from U(0.2, 0.8); returns the
    mean training loss of each epoch."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    bar = progress(total=options.epochs * len(samples), desc=desc)
    epoch_losses = []
    for epoch in range(options.epochs):
        running = 0.0
        for index in torch.randperm(len(samples), generator=generator).tolist():
            fraction = 0.2 + 0.6 * float(torch.rand((), generator=generator))
            loss = coverage_loss(policy, samples[index], fraction, options.c_min)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
        epoch_losses.append(running / len(samples))
    bar.close()
    return epoch_losses


@torch.no_grad()
def allocation_table(
    policy: BudgetPolicy, samples: list[TeacherSample], c_min: int, alpha_safeguard: float
) -> dict[str, dict[str, dict[str, float]]]:
    """Held-out coverage per kept fraction c and allocation, every allocation keeping H·int(c·T) tokens per layer:
    `allocation` = mean over heads of g_h(k_h) (the k_h most attended tokens: what the loss measures) and
    `selected` = mean over heads of the teacher share û on the tokens the base scorer keeps under that allocation
    (what compression keeps). Learned: the policy's budgets; uniform: int(c·T) per head; AdaKV: the counts and
    tokens of its global top-k over the base scores (α_safeguard)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for fraction in TABLE_FRACTIONS:
        sums = {name: [0.0, 0.0] for name in ALLOCATIONS}
        heads_seen = 0
        for sample in samples:
            alpha = policy(sample.statistics)
            length = sample.length
            n_kept = tokens_for_budget(length, fraction)
            for layer in range(alpha.shape[0]):
                scores = sample.scores[fraction][layer]
                heads = scores.shape[0]
                chosen = {
                    "learned": select_per_head(scores, head_budgets(alpha[layer], length, heads * n_kept, c_min)),
                    "uniform": list(top_indices(scores, n_kept)),
                    "adakv": list(adaptive_indices(scores, n_kept, alpha_safeguard)),
                }
                for name, indices in chosen.items():
                    for head, kept in enumerate(indices):
                        sums[name][0] += float(sample.curves[layer, head, kept.numel()])
                        sums[name][1] += float(sample.shares[layer, head, kept].sum())
                heads_seen += heads
        table[f"{fraction:g}"] = {
            name: {"allocation": total[0] / heads_seen, "selected": total[1] / heads_seen}
            for name, total in sums.items()
        }
    return table


def format_table(table: dict[str, dict[str, dict[str, float]]], base: str) -> str:
    """The held-out coverage table as printed at the end of `kvbench train adaptive_policy`."""
    lines = [
        "held-out attention-mass coverage (mean over texts, layers, KV heads; higher is better)",
        f"  allocation: of each head's k_h most attended tokens; selected: of the tokens {base} keeps with k_h",
        f"  {'c':>5}  {'':10}" + "".join(f"{name:>10}" for name in ALLOCATIONS),
    ]
    for fraction, row in table.items():
        for kind in ("allocation", "selected"):
            cells = "".join(f"{row[name][kind]:>10.4f}" for name in ALLOCATIONS)
            lines.append(f"  {fraction:>5}  {kind:10}{cells}")
    return "\n".join(lines)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the policy's steps on one CPU thread: its tensors are a few hundred kilobytes, and on shared cores two
    threads made a step 30 times slower (0.5 s against 16 ms, measured on SmolLM2's shapes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seconds_since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def initial_policy(head_dim: int, hidden: int, seed: int, statistics: torch.Tensor) -> BudgetPolicy:
    """The policy at its seeded start, standardized on the training statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = BudgetPolicy(head_dim, hidden)
    policy.standardize_on(statistics)
    return policy


def epochs_record(losses: list[float]) -> list[float]:
    return [round(loss, 6) if math.isfinite(loss) else loss for loss in losses]

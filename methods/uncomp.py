"""UNComp: KV-head groups ranked by query matrix entropy get graded budgets, held fixed while decoding
(Xiong et al., arXiv 2410.03090; EMNLP 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F

from kvbench.harness.cache.kv_cache import CompressedLayer, KVBenchCache
from kvbench.harness.cache.prefix import LayerPrefix, Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import KVBenchError
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.budget import KEYS_AND_VALUES, TokenCost, kv_cost
from kvbench.methods.common.calibration_data import calibration_ids
from kvbench.methods.common.eviction import gather_heads, snapkv_prefix_scores
from kvbench.methods.common.head_scores import observe_all_queries, truncated_matrix_entropy
from kvbench.methods.common.query_log import QueryLog, attach_query_log, logged_state


@dataclass(frozen=True)
class UNCompConfig:
    """arXiv 2410.03090, variant `uncomp` (2 groups), official-code defaults: window w = 8, max pooling with
    kernel 7, entropy truncation k = 32, high : low budgets 2 : 1 (averaging the budget, not 1.125× it).

    Groups come from the truncated matrix entropy of post-RoPE queries on offline prose (the pydoc topics),
    `calibration_samples` passages of `calibration_tokens` tokens; the code uses 100 × 4096 WikiText-2
    tokens, kvbench 8 × 2048 so that calibrating SmolLM2 once on 2 CPU cores takes a minute or two. KV heads
    are grouped within each layer by their query heads' mean entropy rank; groups differ in size by at most
    one head, the higher groups taking the extra (SmolLM2's 3 KV heads: 2 high, 1 low). With `groups` > 2
    budgets fall linearly from `budget_ratio` to 1 (the paper's 8 groups, 640 down to 122 in steps of 74,
    is budget_ratio = 640/122). The `uncomp_stage` variant, which prunes hidden states inside the prefill,
    is not implemented.
    """

    window: int = option(8, at_least=1)
    kernel: int = option(7, at_least=1, odd=True)
    entropy_rank: int = option(32, at_least=1)
    groups: int = option(2, at_least=1)
    budget_ratio: float = option(2.0, at_least=1)  # the high-entropy group gets more
    calibration_samples: int = option(8, at_least=1)
    calibration_tokens: int = option(2048, at_least=2)  # an entropy of queries centred over tokens needs two
    seed: int = option(0, at_least=0)


def rank_groups(keys: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, H] keys → group ids, 0 for the smallest keys of each layer.

    Heads sorted by key (ties by index) are cut into `groups` runs whose sizes differ by at most one, the
    earlier groups taking the extra heads: every head lands in exactly one group, for any head count.
    """
    order = keys.argsort(dim=-1, stable=True)
    ids = torch.empty_like(order)
    for group, positions in enumerate(torch.arange(keys.shape[-1]).tensor_split(groups)):
        ids.scatter_(-1, order[:, positions], group)
    return ids


def entropy_groups(entropies: list[torch.Tensor], num_kv_heads: int, groups: int) -> torch.Tensor:
    """Per-sample query-head entropies [L, H_q] → group id per KV head [L, H_kv], 0 = highest entropy.

    In each sample a layer's query heads are ranked by entropy (0 = highest) and a KV head takes the mean rank
    of its query group; those ranks put the KV heads into groups. Over the samples, the heads most often in
    the higher groups form them (ties broken by the summed mean rank).
    """
    labels = ranks = None
    for entropy in entropies:
        query_rank = (-entropy).argsort(dim=-1, stable=True).argsort(dim=-1).float()
        kv_rank = query_rank.reshape(entropy.shape[0], num_kv_heads, -1).mean(dim=-1)
        sample_labels = rank_groups(kv_rank, groups).float()
        labels = sample_labels if labels is None else labels + sample_labels
        ranks = kv_rank if ranks is None else ranks + kv_rank
    return rank_groups(labels + ranks / (ranks.max() + 1), groups)


def group_weights(groups: int, ratio: float) -> list[Fraction]:
    """Budget weight per group, falling linearly from `ratio` (highest entropy) to 1."""
    if groups == 1:
        return [Fraction(1)]
    r = Fraction(ratio)
    return [r - (r - 1) * Fraction(g, groups - 1) for g in range(groups)]


def graded_capacities(total: int, weights: list[Fraction], low: int, high: int) -> list[int]:
    """Integers in [low, high] proportional to `weights` where the bounds allow, summing exactly to `total`.

    c_h = clamp(λ·w_h, low, high) with λ solved exactly (the sum is piecewise linear in λ), then rounded by
    largest remainder, so the mean is exactly total / H and no head leaves its bounds.
    """

    def filled(lam: Fraction) -> Fraction:
        return sum((min(max(lam * w, low), high) for w in weights), Fraction(0))

    points = sorted({Fraction(bound) / w for w in weights for bound in (low, high)})
    lam = points[-1]
    for a, b in zip(points, points[1:]):
        if filled(b) >= total:
            fa, fb = filled(a), filled(b)
            lam = a if fb == fa else a + (total - fa) * (b - a) / (fb - fa)
            break
    exact = [min(max(lam * w, Fraction(low)), Fraction(high)) for w in weights]
    counts = [math.floor(c) for c in exact]
    remainder = total - sum(counts)
    by_fraction = sorted(range(len(exact)), key=lambda h: (-(exact[h] - counts[h]), h))
    for h in by_fraction[:remainder]:
        counts[h] += 1
    return counts


def head_capacities(
    group_ids: torch.Tensor, context_length: int, budget: float, config: UNCompConfig, cost: TokenCost = KEYS_AND_VALUES
) -> list[list[int]]:
    """Tokens each KV head keeps of the context, per layer: on average the most that `cost` allows at b, graded
    by group (⌊b·N⌋ for keys and values alone; fewer once the decode state is paid, `decode_cost`).

    The floor makes the budget a ceiling: the kept keys and values, with the state, never exceed b of the full
    cache. Each head keeps at least its window + 1 and at most the whole context; a head whose capacity covers
    the context is left whole (at b = 1, all are).
    """
    n = context_length
    low = min(config.window + 1, n)
    mean = cost.kept("uncomp", n, budget, low, f"its window + 1 = {low}")
    weights = group_weights(config.groups, config.budget_ratio)
    heads = group_ids.shape[1]
    return [graded_capacities(mean * heads, [weights[g] for g in layer.tolist()], low, n) for layer in group_ids]


def decode_cost(observation: Observation, window: int) -> TokenCost:
    """What keeping tokens costs with the decode state paid from the budget: every layer evicts below b = 1, and
    keeps the w most recent queries ([H_q, w, d] in the observed dtype, `DecodeState.queries`)."""
    queries = observation.window_queries
    return kv_cost(observation, fixed=sum(q[:, -window:].numel() * q.element_size() for q in queries))


def kept_indices(rows: torch.Tensor, size: int, window: int, kernel: int) -> torch.Tensor:
    """Which of a head's n stored tokens stay: pool → top (size − w) → append the w most recent.

    rows [g, w, n] are the last w attention rows of the head's query group; as at the prefill (SnapKV), the
    rows are averaged and max-pooled per query head over the tokens before the recent ones, then averaged
    over the group.
    """
    n = rows.shape[-1]
    if n <= size:
        return torch.arange(n, device=rows.device)
    scores = rows[..., : n - window].mean(dim=1)
    pooled = F.max_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2)[:, 0].mean(dim=0)
    top = pooled.topk(size - window).indices.sort().values
    return torch.cat([top, torch.arange(n - window, n, device=rows.device)])


def attention_rows(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention [g, m, n] of queries [g, m, d] over one head's stored keys [n, d], fp32.

    The queries are those of the m most recent tokens, which are also the head's last m stored keys (the
    window always stays, and stored keys are in position order): only among those does causality mask.
    """
    m, n = queries.shape[1], keys.shape[0]
    logits = (queries.float() @ keys.float().transpose(-1, -2)) * scaling
    future = torch.arange(n, device=keys.device)[None, :] > torch.arange(n - m, n, device=keys.device)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


@dataclass
class DecodeState:
    """One sequence's eviction state, in its cache's `method_state` (where `kv_bytes` counts it); its size does
    not grow with the context.

    queries: per evicting layer, the post-RoPE queries [H_q, w, d] of the w most recent tokens: the running
    window, whose attention rows are recomputed over the stored keys at each step (the rows themselves,
    [g, w, n] per head, would cost about a fifth of the fp32 KV cache they score). No positions are kept:
    stored tokens stay in position order and the w most recent are always the last w stored, which is all
    that causality and recency need. evicting: per evicting layer, which KV heads were compressed (a head kept
    whole never evicts). log: the decode cache's query recorder, attached by `on_decode_start`. sizes: per
    (layer, head), the size held while decoding, fixed at the first step.
    """

    queries: dict[int, torch.Tensor]
    evicting: dict[int, list[bool]]
    scaling: float
    log: QueryLog | None = None
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)


@register
class UNComp(Method):
    """After the prefill each head keeps its group's capacity (SnapKV-style selection); while decoding, every
    compressed head evicts one token per generated token, holding the size it had when generation began
    (its capacity plus the question). A head whose capacity covers the context is never compressed, so
    b = 1 is the full cache. The budget pays for the decode state too: below b = 1 every layer keeps its last w
    queries ([H_q, w, d], a fixed H_q·w/(2·H_kv) tokens per head's worth of bytes: 12 on SmolLM2 at w = 8), and
    the heads' mean capacity is what is left of b·N once they are paid. The running window needs the queries of
    the question and generated tokens:
    the harness's attention hands them to the recorder slot of the decode cache, where `QueryLog` sits.
    Everything a sequence needs while decoding (`DecodeState`) travels in its cache's `method_state`, so any
    cache this method compressed can be decoded, in any order.
    """

    name = "uncomp"
    version = 3  # budgets round down (a ceiling), the decode state's queries paid from them
    family = "token eviction (per-head-group budgets, decode-time)"
    description = "Entropy-ranked KV-head groups with 2:1 budgets; SnapKV selection; one eviction per decode step"
    Config = UNCompConfig
    needs_calibration = True

    def __init__(self, config: UNCompConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.group_ids: torch.Tensor | None = None

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(window=self.config.window)

    def calibration_key(self) -> str:
        # The groups depend on the entropy and its data only; window, kernel and budgets act at compress time.
        c = self.config
        return (
            f"entropy_rank={c.entropy_rank} groups={c.groups} calibration_samples={c.calibration_samples} "
            f"calibration_tokens={c.calibration_tokens} seed={c.seed}"
        )

    def calibrate(self, model: torch.nn.Module, tokenizer) -> dict[str, torch.Tensor]:
        c = self.config
        ids = calibration_ids(tokenizer, c.calibration_samples * c.calibration_tokens, c.seed)
        entropies = []
        for start in range(0, len(ids), c.calibration_tokens):
            observation = observe_all_queries(model, ids[start : start + c.calibration_tokens])
            entropies.append(
                torch.stack([truncated_matrix_entropy(q, c.entropy_rank) for q in observation.window_queries]).cpu()
            )
        return {"group_ids": entropy_groups(entropies, observation.num_kv_heads, c.groups)}

    def load_calibration(self, artifacts: dict[str, torch.Tensor]) -> None:
        self.group_ids = artifacts["group_ids"]

    def _compress(self, observation: Observation, budget: float) -> Prefixes:
        n, window = observation.context_length, self.config.window
        groups = self._groups_for(observation)
        capacities = head_capacities(groups, n, budget, self.config, decode_cost(observation, window))
        prefixes: list[LayerPrefix] = []
        queries: dict[int, torch.Tensor] = {}
        evicting: dict[int, list[bool]] = {}
        for layer, caps in enumerate(capacities):
            if min(caps) >= n:
                prefixes.append(TokenPrefix(observation.keys[layer], observation.values[layer], first_position=0))
                continue
            scores = snapkv_prefix_scores(observation, layer, window, self.config.kernel, "max")
            device = scores.device
            recent = torch.arange(n - window, n, device=device)
            kept = [
                torch.cat([scores[head].topk(cap - window).indices, recent]).sort().values
                if cap < n
                else torch.arange(n, device=device)
                for head, cap in enumerate(caps)
            ]
            prefixes.append(gather_heads(observation, layer, kept))
            evicting[layer] = [cap < n for cap in caps]
            # A copy: the observation's window may be longer than w and is shared by every cell of the sweep.
            queries[layer] = observation.window_queries[layer][:, -window:].clone()
        state = DecodeState(queries, evicting, observation.scaling) if evicting else None
        return Prefixes(prefixes, decode_state=state)

    def _groups_for(self, observation: Observation) -> torch.Tensor:
        if self.group_ids is None:
            raise KVBenchError("uncomp has no head groups yet; run 'kvbench calibrate uncomp --model MODEL' first")
        expected = (observation.num_layers, observation.num_kv_heads)
        if tuple(self.group_ids.shape) != expected:
            raise KVBenchError(
                f"uncomp's head groups cover {tuple(self.group_ids.shape)} (layers, KV heads) but the model has "
                f"{expected}; recalibrate with 'kvbench calibrate uncomp --force'"
            )
        return self.group_ids

    def on_decode_start(self, cache: KVBenchCache) -> None:
        """The running window needs the question's queries too: record from the first forward on."""
        if cache.method_state is not None:
            attach_query_log(cache, list(cache.method_state.queries))

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Evict one token per compressed head, so each holds the size it had when generation began."""
        state = logged_state(cache, self.name)
        if state is None:
            return
        for layer in state.queries:
            self._evict(state, layer, cache.layers[layer])

    def _evict(self, state: DecodeState, layer: int, cached: CompressedLayer) -> None:
        new_queries = state.log.take(layer)
        prefix = cached.prefix.materialize()
        tail_keys, tail_values = cached.keys[0], cached.values[0]
        new = tail_keys.shape[1]
        if new_queries.shape[1] != new:
            raise RuntimeError(f"uncomp saw {new_queries.shape[1]} new queries for {new} new tokens in layer {layer}")
        window = self.config.window
        # A copy, not a view of the concatenation: the state holds exactly w queries.
        queries = torch.cat([state.queries[layer], new_queries], dim=1)[:, -window:].clone()
        state.queries[layer] = queries
        group = queries.shape[0] // tail_keys.shape[0]
        head_keys, head_values = [], []
        for head in range(tail_keys.shape[0]):
            keys = torch.cat([prefix.keys[head], tail_keys[head]])
            values = torch.cat([prefix.values[head], tail_values[head]])
            if state.evicting[layer][head]:
                rows = attention_rows(queries[head * group : (head + 1) * group], keys, state.scaling)
                size = state.sizes.setdefault((layer, head), keys.shape[0] - 1)
                keep = kept_indices(rows, size, window, self.config.kernel)
                keys, values = keys[keep], values[keep]
            head_keys.append(keys)
            head_values.append(values)
        cached.absorb_tail(TokenPrefix(head_keys, head_values))

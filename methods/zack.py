"""ZACK: per-head channel reduction of K and V with offline SVD bases (Zhang & Shen, arXiv 2408.04107).

Keys are projected after RoPE, never folded into W_K: with rotary embeddings the paper's "zero overhead"
folding is not exact, so the cache stores RoPE(K)·R_K and V·R_V and attention decompresses them
transiently (`LowRankPrefix.materialize`). Decompressing rather than projecting the queries keeps
attention on the harness's SDPA path; (Q·R_K)(K·R_K)ᵀ = Q·(K·R_K·R_Kᵀ)ᵀ, so the logits are the same.

As in the paper, the projection applies while the context is prefilled (`projected_prefill`): every layer's
attention already reads its reconstructed keys and values, so each layer's output, the next layer's input,
carries the error of the layers below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.harness.cache.kv_cache import CompressedLayer, KVBenchCache
from kvbench.harness.cache.prefix import LayerPrefix, LowRankPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, context_forward, prefill
from kvbench.harness.errors import BudgetError, KVBenchError, Unsupported, check_budget
from kvbench.harness.method_spec import option
from kvbench.harness.models.loading import head_dim, kv_heads
from kvbench.methods.base import Method, register
from kvbench.methods.common.calibration_data import calibration_ids


@dataclass(frozen=True)
class ZACKConfig:
    """arXiv 2408.04107 (ZACK; v1 "ZeroC", v3 "FDC") as specified in specs/baselines.md §1.

    Calibration: `calibration_samples` × `calibration_tokens` tokens of offline prose (Python's
    documentation topics, `calibration_ids` with seeds seed, seed+1, ...), the spec's 32 × 2048. Fewer,
    shorter samples fit the bases on keys rotated by early positions only; later positions turn RoPE's
    slow channel pairs further than the bases ever saw.

    Budget: b counts the stored bases too (the spec reports them separately): a head at rank r < d holds
    (N + d)·r elements against N·d uncompressed, so the bases cost d/N of every kept channel (6% at 1k
    tokens on SmolLM2). A rank that would cost as much as the raw head (r ≥ N·d/(N + d)) is stored raw
    instead (exact, no basis), so b = 1 is the full cache. Ranks therefore depend on N and are chosen per
    context from the calibrated energies, not stored at calibration.

    Ranks: every head's K and V first get `r_min` = 8 channels (the spec's floor); the rest of the budget goes
    to the globally largest normalised σ², K and V each taking half of it (same ratio for K and V). A budget
    that cannot pay r_min channels plus their bases for every head (b < r_min/d + r_min/N: b = 0.1 on SmolLM2,
    d = 64) is refused, as the spec says, naming the lowest reachable budget.

    Prefill (`project_during_prefill`): the paper writes every token to the cache already projected and
    attends to the projected cache, the context's tokens included, so the error of layer l's keys and values
    reaches layer l + 1 through layer l's output and compounds through the layers. True (the default, the
    paper's mode) runs that prefill: the method prefills itself below b = 1 (at b = 1 nothing is projected and
    it shares the plain prefill), and the cache holds the codes of the keys and values its own prefill computed.
    False projects the cache of an exact, shared prefill afterwards: only the layers' own caches are
    approximated, never their inputs, which flatters ZACK (kvbench's mode before the paper's, kept as the
    ablation). Both use the same bases, fitted offline on an exact prefill, and store the same ranks and
    bytes. In both, the question and generated tokens stay in the uncompressed tail, as for every kvbench
    method; the paper projects those too.
    """

    calibration_samples: int = option(32, at_least=1)
    calibration_tokens: int = option(2048, at_least=1)
    seed: int = option(0, at_least=0)
    r_min: int = option(8, at_least=1)
    project_during_prefill: bool = True


def output_projection(block: torch.nn.Module) -> torch.nn.Linear:
    """A decoder layer's attention output projection (Llama's self_attn.o_proj, GPT-NeoX's attention.dense), or
    a one-line refusal naming what the layer lacks."""
    attention = getattr(block, "self_attn", None) or getattr(block, "attention", None)
    projection = getattr(attention, "o_proj", None) or getattr(attention, "dense", None)
    if not isinstance(projection, torch.nn.Linear):
        raise Unsupported(
            f"zack weighs value channels by each layer's attention output projection; {type(block).__name__} has "
            "no self_attn.o_proj or attention.dense"
        )
    return projection


def _principal_axes(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors (columns, σ descending) and normalised σ² of the rows whose Gram matrix is given.

    The SVD of a row-stack X has Xᵀ X = R S² Rᵀ, so accumulating Xᵀ X over the calibration samples gives
    the same bases with memory independent of the calibration length.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.flip(-1).clamp_min(0)
    energy = eigenvalues / eigenvalues.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    return eigenvectors.flip(-1), energy


@torch.inference_mode()
def calibrate_bases(model: torch.nn.Module, samples: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per (layer, KV head): R_K from [the group's post-RoPE queries; K_j], R_V from [V_j; W_O slices of the group].

    Returns key_bases/value_bases [L, H_kv, d, d] (float32, columns by σ descending) and
    key_energy/value_energy [L, H_kv, d] (σ² / Σσ², the order ranks are handed out in).
    """
    config = model.config
    num_layers, h_q, h_kv = config.num_hidden_layers, config.num_attention_heads, kv_heads(config)
    d, group = head_dim(config), h_q // h_kv
    key_gram = torch.zeros(num_layers, h_kv, d, d, dtype=torch.float64)
    value_gram = torch.zeros_like(key_gram)
    for ids in samples:
        observation = prefill(model, ids, ObservationNeeds(window=len(ids)))
        for layer in range(num_layers):
            queries = observation.window_queries[layer].to("cpu", torch.float64).reshape(h_kv, group * len(ids), d)
            keys = observation.keys[layer].to("cpu", torch.float64)
            values = observation.values[layer].to("cpu", torch.float64)
            key_gram[layer] += queries.transpose(-1, -2) @ queries + keys.transpose(-1, -2) @ keys
            value_gram[layer] += values.transpose(-1, -2) @ values
    for layer, block in enumerate(model.get_decoder().layers):
        # The output projection's weight is [D, H_q·d]; its columns for head h are W_O,hᵀ (D×d), stacked under V_j.
        out = output_projection(block).weight.detach().to("cpu", torch.float64).reshape(-1, h_q, d).transpose(0, 1)
        grouped = out.reshape(h_kv, group * out.shape[1], d)
        value_gram[layer] += grouped.transpose(-1, -2) @ grouped
    key_bases, key_energy = _principal_axes(key_gram)
    value_bases, value_energy = _principal_axes(value_gram)
    return {
        "key_bases": key_bases.float(),
        "value_bases": value_bases.float(),
        "key_energy": key_energy.float(),
        "value_energy": value_energy.float(),
    }


def _rank_cost(rank: int, context_length: int, d: int) -> int:
    """Elements one head stores at `rank`: codes plus basis, or its raw channels once that is no dearer."""
    n = context_length
    return n * d if rank >= math.ceil(n * d / (n + d)) else (n + d) * rank


def lowest_budget(context_length: int, d: int, r_min: int) -> float:
    """The smallest b that pays `r_min` channels and their basis for every head (b = r_min/d + r_min/N)."""
    return _rank_cost(min(r_min, d), context_length, d) / (context_length * d)


def allocate_ranks(energy: torch.Tensor, capacity: int, context_length: int, r_min: int) -> list[int]:
    """Ranks per head ([heads, d] normalised σ², descending per head) whose codes plus bases fit `capacity` elements.

    A head at rank r stores (N + d)·r elements (codes and basis); from r ≥ N·d/(N + d) on, storing its
    raw N·d channels is no dearer and exact, so it is stored raw (rank d, no basis). After the floor of
    `r_min` channels per head, the next channel always goes to the head with the largest remaining
    normalised σ² (global greedy). A capacity below the floor is refused.
    """
    heads, d = energy.shape
    n = context_length
    raw_from = math.ceil(n * d / (n + d))
    floor = min(r_min, d)
    spent = heads * _rank_cost(floor, n, d)
    if spent > capacity:
        raise BudgetError(
            f"zack keeps at least {floor} of {d} channels per KV head plus their bases; {capacity} elements "
            f"cannot pay that for {heads} heads at {n} tokens (needs b >= {lowest_budget(n, d, r_min):.3g})"
        )
    ranks = [d if floor >= raw_from else floor] * heads
    owners = torch.arange(heads, device=energy.device).repeat_interleave(d - floor)
    order = torch.sort(energy[:, floor:].flatten(), descending=True, stable=True).indices
    for head in owners[order].tolist():
        if ranks[head] == d:
            continue
        grown = d if ranks[head] + 1 >= raw_from else ranks[head] + 1
        step = _rank_cost(grown, n, d) - _rank_cost(ranks[head], n, d)
        if spent + step > capacity:
            break
        ranks[head], spent = grown, spent + step
    return ranks


def _bases_for(bases: torch.Tensor, ranks: list[int], dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Each head's first r columns; None for heads kept raw (full rank)."""
    d = bases.shape[-1]
    return [None if r == d else bases[h, :, :r].to(dtype) for h, r in enumerate(ranks)]


LayerBases = list[torch.Tensor | None]


class _ProjectingLayer(CompressedLayer):
    """A prefill cache layer that hands attention its keys and values already projected and reconstructed.

    It stores the layer's keys and values as computed (exactly as a plain prefill would) and keeps their codes in
    `projected`; attention reads `projected.materialize()`, K ≈ (K·B_k)·B_kᵀ, the very tensors the decode will
    read from the finished cache.
    """

    def __init__(self, key_basis: LayerBases, value_basis: LayerBases):
        super().__init__()
        self.key_basis, self.value_basis = key_basis, value_basis
        self.projected: LowRankPrefix | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.projected is not None:
            raise RuntimeError("zack's projecting prefill takes the whole context in one pass")
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        key_basis = [None if b is None else b.to(keys.dtype) for b in self.key_basis]
        value_basis = [None if b is None else b.to(values.dtype) for b in self.value_basis]
        self.projected = LowRankPrefix(keys[0], values[0], key_basis, value_basis)
        restored = self.projected.materialize()
        return restored.keys[None], restored.values[None]


@torch.inference_mode()
def projected_prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor | list[int],
    key_bases: list[LayerBases],
    value_bases: list[LayerBases],
) -> tuple[list[LowRankPrefix], torch.Tensor]:
    """The paper's prefill: one pass over the context in which layer l attends to its own keys and values
    projected onto `key_bases[l]`/`value_bases[l]` (per KV head, [d, r] or None for a raw head) and reconstructed.

    Projection acts on each token alone, so one causal pass equals writing the tokens one by one to a projected
    cache. Returns each layer's prefix (codes of the keys and values this prefill computed, whose inputs carry the
    lower layers' error) and the next-token logits after the context.
    """
    device = model.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    n = ids.shape[1]
    if n == 0:
        raise ValueError("cannot prefill an empty context")
    cache = KVBenchCache(len(key_bases))
    cache.layers[:] = [_ProjectingLayer(k, v) for k, v in zip(key_bases, value_bases, strict=True)]
    out = context_forward(model, ids, cache)
    return [layer.projected for layer in cache.layers], out.logits[0, -1]


@register
class ZACK(Method):
    name = "zack"
    family = "channel reduction, own prefill"
    description = (
        "Per-head SVD bases of post-RoPE K (fit with its queries) and V (with W_O), applied while it prefills; "
        "ranks by global energy"
    )
    Config = ZACKConfig
    needs_calibration = True

    def __init__(self, config: ZACKConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.artifacts: dict[str, torch.Tensor] | None = None

    def calibrate(self, model: torch.nn.Module, tokenizer) -> dict[str, torch.Tensor]:
        config = self.config
        samples = [
            calibration_ids(tokenizer, config.calibration_tokens, config.seed + i)
            for i in range(config.calibration_samples)
        ]
        return calibrate_bases(model, samples)

    def load_calibration(self, artifacts: dict[str, torch.Tensor]) -> None:
        self.artifacts = artifacts

    def calibration_key(self) -> str:
        """The bases depend on the calibration data only; r_min acts at compress time."""
        config = self.config
        return f"samples={config.calibration_samples} tokens={config.calibration_tokens} seed={config.seed}"

    def needs(self) -> ObservationNeeds:
        return ObservationNeeds(own_prefill=self.config.project_during_prefill)

    def prefills_itself(self, model_config, context_length: int, budget: float) -> bool:
        """In the paper's mode below b = 1. At b = 1 every head is stored raw (no basis, nothing projected), so the
        projecting prefill would be the plain one: the cell shares it."""
        return self.config.project_during_prefill and check_budget(budget) < 1.0

    def prefill_and_compress(
        self, model: torch.nn.Module, input_ids: list[int], budget: float
    ) -> tuple[KVBenchCache, torch.Tensor]:
        """The paper's mode: prefill with every layer attending to its projected keys and values (`projected_prefill`)."""
        config = model.config
        shape = (config.num_hidden_layers, kv_heads(config), head_dim(config))
        artifacts = self._checked_artifacts(shape, model.device)
        key_bases, value_bases = self._layer_bases(artifacts, check_budget(budget), shape, len(input_ids), model.dtype)
        prefixes, logits = projected_prefill(model, input_ids, key_bases, value_bases)
        return KVBenchCache(len(prefixes), prefixes, len(input_ids)), logits

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        """Project the cache of a finished prefill (`project_during_prefill=False`, or b = 1 where nothing is
        projected)."""
        shape = (observation.num_layers, observation.num_kv_heads, observation.head_dim)
        artifacts = self._checked_artifacts(shape, observation.keys[0].device)
        n = observation.context_length
        key_bases, value_bases = self._layer_bases(artifacts, budget, shape, n, observation.keys[0].dtype)
        projects = any(basis is not None for layer in key_bases + value_bases for basis in layer)
        if self.config.project_during_prefill and projects:
            raise RuntimeError(
                f"{self.name} projects while it prefills at budget {budget:g} (project_during_prefill) and cannot "
                "compress a finished prefill; call prefill_and_compress (run_cell does)"
            )
        return [
            LowRankPrefix(keys, values, key_basis, value_basis)
            for keys, values, key_basis, value_basis in zip(
                observation.keys, observation.values, key_bases, value_bases, strict=True
            )
        ]

    def _layer_bases(
        self,
        artifacts: dict[str, torch.Tensor],
        budget: float,
        shape: tuple[int, int, int],
        n: int,
        dtype: torch.dtype,
    ) -> tuple[list[LayerBases], list[LayerBases]]:
        """Per layer, each KV head's basis at its rank for this budget and context length (None: stored raw)."""
        num_layers, h_kv, d = shape
        lowest = lowest_budget(n, d, self.config.r_min)
        if budget < lowest:
            raise BudgetError(
                f"zack keeps at least {min(self.config.r_min, d)} of {d} channels per KV head plus their bases, "
                f"so budget {budget:g} is unreachable on this {n}-token context; the lowest reachable budget is "
                f"{math.ceil(lowest * 100) / 100:g}"
            )
        # K and V get the same share of the budget's elements; each pool is allocated globally over (layer, head).
        capacity = int(budget * num_layers * h_kv * n * d)
        key_ranks = allocate_ranks(artifacts["key_energy"].flatten(0, 1), capacity, n, self.config.r_min)
        value_ranks = allocate_ranks(artifacts["value_energy"].flatten(0, 1), capacity, n, self.config.r_min)
        key_bases, value_bases = [], []
        for layer in range(num_layers):
            heads = slice(layer * h_kv, (layer + 1) * h_kv)
            key_bases.append(_bases_for(artifacts["key_bases"][layer], key_ranks[heads], dtype))
            value_bases.append(_bases_for(artifacts["value_bases"][layer], value_ranks[heads], dtype))
        return key_bases, value_bases

    def _checked_artifacts(self, shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
        """The loaded artifacts on `device`, checked against the model's (layers, KV heads, head_dim)."""
        if self.artifacts is None:
            raise KVBenchError("zack has no calibration loaded; run 'kvbench calibrate zack --model <model>' first")
        num_layers, h_kv, d = shape
        expected = (num_layers, h_kv, d, d)
        if tuple(self.artifacts["key_bases"].shape) != expected:
            raise KVBenchError(
                f"zack's calibration is for another model shape {tuple(self.artifacts['key_bases'].shape)}, "
                f"not {expected}; recalibrate with 'kvbench calibrate zack --model <model> --force'"
            )
        return {name: tensor.to(device) for name, tensor in self.artifacts.items()}

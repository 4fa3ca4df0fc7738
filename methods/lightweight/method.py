"""Lightweight (seed 004, seed_methods.md (d)): a tiny trained scorer per (layer, KV head) decides which tokens stay,
after the prefill and at every decode step.

The scorer (linear or MLP, `methods/lightweight/features.py`) scores each context token from its features; each
KV head keeps its best tokens, the first `global_tokens` and last `recent_window` always among them. While
decoding, each head's cache keeps the size it had when generation began (its budget plus the question): every new
token's features join the decode state and each head evicts its lowest-scoring unprotected token. The state (the
running attention estimates, positions and the fixed features of every kept token, and the new tokens' queries
and hidden states until a step takes them) lives in `cache.method_state`, where `kv_bytes` counts it; the
scorer's weights are `method_bytes`. Training: `methods/lightweight/training.py` (`kvbench train lightweight`).

The budget pays for the state: a kept token costs its key and value plus, per head, an int32 position, an fp32
attn_score (when selected) and its fp32 fixed features, so each head keeps the most tokens whose keys, values and
state fit b of the full cache (with the default features on SmolLM2 in fp32, 24 bytes of state next to 512 of
keys and values: 0.955·b·N tokens instead of b·N).

Cost (the seed needed eager attention for its features): the prefill itself stays SDPA; it collects every context
query and, for vector features, each layer's input hidden states (H_q·N·d + N·D floats per layer, transient), and
attn_score recomputes the causal attention from those queries in chunks of rows (N² per query head, never
materialised), as H2O's column sums do. Decoding costs one attention row per new token and layer over the kept
tokens. One sequence at a time: a batch is refused in one line.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from kvbench.harness.artifacts.training import Trained
from kvbench.harness.cache.batched import BatchedCache
from kvbench.harness.cache.kv_cache import CompressedLayer, KVBenchCache
from kvbench.harness.cache.prefix import Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import KVBenchError
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.budget import kv_cost
from kvbench.methods.common.eviction import decode_attention, gather_heads, tokens_for_budget, top_indices
from kvbench.methods.common.query_log import QueryLog, logged_state
from kvbench.methods.lightweight import features as lw


@dataclass(frozen=True)
class LightweightConfig:
    """Seed 004 (StefanieSwz/cold-compress, a master's thesis; no paper id) as seed_methods.md (d) specifies it.

    features: comma-separated selection among attn_score, vector_norm, vector_cv, vector_z_score, token_profiling,
        normalized_pos, convolution, or `all`; default the seed code's `attn_score,vector_norm` (its
        lightweight.yaml uses all seven with an MLP). scorer: `linear` (the code's default) or `mlp` (F→2F→ReLU→1).
    global_tokens / recent_window: 4 / 10 (the seed's inference defaults), protected in training, after the
        prefill and while decoding alike. conv_channels: C_h of the double convolution.
    standardize: the scorer reads each feature standardised, (f − mean) / std per (layer, KV head, feature) with
        the statistics of the training split's context tokens, stored in the checkpoint and applied unchanged at
        prefill and decode; the convolutions' outputs (min-max normalised already) pass as they are. kvbench's
        change, not the seed's, which feeds raw features (‖x‖ ≈ 165 next to attn_score ≈ 1.6 on SmolLM2's layer 15)
        to weights drawn N(0, 0.02): on smollm2-135m at the defaults its MLP then trains to a held-out loss above the
        untrained one's (1.10 vs 1.03; 211 of 300 ReLU units of layer 15 dead), while standardised it reaches 0.44
        (the full cache: 0.37), and the linear scorer 0.56 instead of 0.72. `standardize=false` is the seed's scorer.

    Training (`kvbench train lightweight`): the base LM frozen, only the scorer (and convolutions) train, on
    `samples` offline chat prompts of about `length` tokens (kvbench's task generators with seeds disjoint from
    evaluation's, plus documentation prose with questions about it), whose responses are the full-cache model's
    own greedy answers (≤ `response_tokens`); `heldout_fraction` held out. The relaxation: p = softmax(s/τ) over the
    context, τ = `temperature` (0.7), made into the per-row causal weights w_ij = p_j𝟙[j≤i]/Σ_{j'≤i}p_j' on the
    attention of the tokens that follow the context (question and response: the ones that see a compressed
    context at inference), shared across each query group. Budget-aware by a straight-through top-k at
    `keep_fraction`: the forward pass attends exactly to what inference keeps (protected tokens plus the top-k by
    score, unweighted), the backward pass takes the gradient of the soft weights. Training keeps
    int(keep_fraction·N) tokens, inference at b = keep_fraction a few percent fewer (it pays for its decode state
    from the budget). Cross-entropy on the response tokens only. AdamW lr 5e-3, weight decay 1e-4,
    ReduceLROnPlateau on the held-out loss (factor 0.5, patience 1, min 1e-6), as the seed; `grad_accumulation` 1 instead of its 8 because a CPU run makes ~100 steps, not 10k
    samples × 5 epochs. Defaults (32 prompts of 1024 tokens, 3 epochs) train SmolLM2-135M in minutes on 2 CPU
    cores; on a GPU raise `samples` (thousands), `length` (2048, the seed's) and `grad_accumulation` (8).
    """

    features: str = "attn_score,vector_norm"
    scorer: str = option("linear", choices=("linear", "mlp"))  # features.SCORERS
    global_tokens: int = option(4, at_least=0)
    recent_window: int = option(10, at_least=0)
    conv_channels: int = option(4, at_least=1)
    standardize: bool = True
    temperature: float = option(0.7, above=0)
    keep_fraction: float = option(0.25, above=0, at_most=1)
    samples: int = option(32, at_least=1)
    length: int = option(1024, at_least=1)
    response_tokens: int = option(48, at_least=1)
    heldout_fraction: float = option(0.2, above=0, below=1)
    epochs: int = option(3, at_least=1)
    lr: float = option(5e-3, above=0)
    weight_decay: float = option(1e-4, at_least=0)
    grad_accumulation: int = option(1, at_least=1)
    seed: int = option(0, at_least=0)
    checkpoint: str = ""

    def __post_init__(self) -> None:
        lw.parse_features(self.features)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return lw.parse_features(self.features)


TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(LightweightConfig) if f.name != "checkpoint")
# What the weights' use depends on: a checkpoint whose layout differs from the config is refused.
LAYOUT_FIELDS = ("features", "scorer", "global_tokens", "recent_window", "conv_channels", "standardize")
# Layout fields that checkpoints written before them lack, with the value those checkpoints were trained with.
LAYOUT_BEFORE = {"standardize": False}


def layout_record(config: LightweightConfig, layers: int, heads: int, head_dim: int, hidden: int) -> dict:
    return {
        "features": list(config.feature_names),
        "scorer": config.scorer,
        "global_tokens": config.global_tokens,
        "recent_window": config.recent_window,
        "conv_channels": config.conv_channels,
        "standardize": config.standardize,
        "layers": layers,
        "kv_heads": heads,
        "head_dim": head_dim,
        "hidden": hidden,
    }


class DecodeLog(QueryLog):
    """The decode cache's recorder: the new tokens' post-RoPE queries (from kvbench's attention), their layer-input
    hidden states and their ids (from forward pre-hooks, `install_hooks`), until a decode step takes them."""

    def __init__(self, layers: list[int], hidden: bool, ids: bool):
        super().__init__(layers)
        self.hidden: dict[int, list[torch.Tensor]] | None = {layer: [] for layer in layers} if hidden else None
        self.ids: list[torch.Tensor] | None = [] if ids else None

    def take_hidden(self, layer: int) -> torch.Tensor:
        if not self.hidden or not self.hidden[layer]:
            raise RuntimeError("lightweight saw no hidden states of the new tokens; its hooks are not on this model")
        hidden = torch.cat(self.hidden[layer])
        self.hidden[layer] = []
        return hidden

    def take_ids(self) -> torch.Tensor:
        if not self.ids:
            raise RuntimeError("lightweight saw no ids of the new tokens; its hooks are not on this model")
        ids = torch.cat(self.ids)
        self.ids = []
        return ids


# Bytes the decode state holds per kept token and head: its position, and each of its features (all fp32).
POSITION_BYTES = torch.int32.itemsize
FEATURE_BYTES = torch.float32.itemsize


@dataclass
class LightweightDecodeState:
    """One sequence's decode state, in its cache's `method_state` (where `kv_bytes` counts it), per layer and KV
    head in stored (position) order: attn [H, n] fp32 running attn_score (None when not a feature), positions
    [H, n] int32, static [H, n, F_s] fp32 fixed features (None when none is selected). size: the tokens per head
    held while decoding, fixed at the first step."""

    attn: list[torch.Tensor] | None
    positions: list[torch.Tensor]
    static: list[torch.Tensor | None]
    scaling: float
    log: DecodeLog | None = None
    size: int | None = None


_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _recordings(kwargs: dict) -> list[tuple[int, DecodeLog]]:
    """(row, log) for every decoding lightweight cache in this forward pass: the one cache decoding alone, or each
    row of a `BatchedCache` whose method is lightweight (row b owns batch index b)."""
    cache = kwargs.get("kvbench_cache")
    rows = cache.rows if isinstance(cache, BatchedCache) else [cache]
    found = []
    for b, row in enumerate(rows):
        state = getattr(row, "method_state", None)
        if isinstance(state, LightweightDecodeState) and state.log is not None and row.recorder is state.log:
            found.append((b, state.log))
    return found


def _batch_of(tensor: torch.Tensor, kwargs: dict) -> None:
    cache = kwargs.get("kvbench_cache")
    expected = len(cache.rows) if isinstance(cache, BatchedCache) else 1
    if tensor.shape[0] != expected:
        raise KVBenchError(f"lightweight expected {expected} sequence(s) in this forward pass, got {tensor.shape[0]}")


def _ids_hook(module, args, kwargs) -> None:
    logs = [(b, log) for b, log in _recordings(kwargs) if log.ids is not None]
    if logs:
        ids = kwargs.get("input_ids", args[0] if args else None)
        _batch_of(ids, kwargs)
        for b, log in logs:
            log.ids.append(ids[b].detach().cpu())


def _hidden_hook(layer: int, module, args, kwargs) -> None:
    logs = [(b, log) for b, log in _recordings(kwargs) if log.hidden is not None]
    if logs:
        hidden = args[0] if args else kwargs["hidden_states"]
        _batch_of(hidden, kwargs)
        for b, log in logs:
            log.hidden[layer].append(hidden[b].detach())


def install_hooks(model: torch.nn.Module) -> None:
    """Forward pre-hooks (public PyTorch API, once per model) that hand a decoding lightweight cache the new
    tokens' ids and layer-input hidden states; they do nothing for any other cache."""
    if model in _HOOKED:
        return
    handles = [model.register_forward_pre_hook(_ids_hook, with_kwargs=True)]
    handles += [
        block.register_forward_pre_hook(partial(_hidden_hook, layer), with_kwargs=True)
        for layer, block in enumerate(model.get_decoder().layers)
    ]
    _HOOKED[model] = handles


@register
class Lightweight(Method):
    name = "lightweight"
    family = "token eviction (learned)"
    description = (
        "A tiny trained scorer per KV head picks the tokens to keep after the prefill and evicts while decoding"
    )
    Config = LightweightConfig
    needs_calibration = True
    learns = True
    version = 2  # the decode state is paid from the budget

    def __init__(self, config: LightweightConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.scorer: lw.Scorer | None = None
        self.flags: torch.Tensor | None = None

    def calibration_key(self) -> str:
        return " ".join(f"{name}={getattr(self.config, name)!r}" for name in TRAINING_FIELDS)

    def needs(self) -> ObservationNeeds:
        features = self.config.feature_names
        vectors = lw.needs_vectors(features)
        queries = vectors or "attn_score" in features
        return ObservationNeeds(window=lw.ALL_QUERIES if queries else 0, hidden_states=vectors)

    def calibrate(self, model: torch.nn.Module, tokenizer) -> Trained:
        from kvbench.methods.lightweight.training import train

        return train(model, tokenizer, self.config)

    def load_calibration(self, artifacts: dict[str, torch.Tensor]) -> None:
        config = self.config
        if "layout" not in artifacts:
            raise KVBenchError(
                "lightweight: these weights carry no feature layout; train them with 'kvbench train lightweight'"
            )
        layout = {**LAYOUT_BEFORE, **lw.decode_layout(artifacts["layout"])}
        wanted = {name: getattr(config, name) for name in LAYOUT_FIELDS}
        wanted["features"] = list(config.feature_names)
        differ = [f"{name}={_text(layout.get(name))}" for name in LAYOUT_FIELDS if layout.get(name) != wanted[name]]
        if differ:
            raise KVBenchError(
                f"lightweight's checkpoint was trained with {', '.join(differ)}; set those options (e.g. "
                f"lightweight:{':'.join(differ)}:checkpoint=...) or train one for this configuration"
            )
        scorer = lw.Scorer(
            config.scorer,
            config.feature_names,
            layout["layers"],
            layout["kv_heads"],
            layout["head_dim"],
            layout["hidden"],
            config.conv_channels,
            0,
            config.standardize,
        )
        weights = {name[len("scorer.") :]: t for name, t in artifacts.items() if name.startswith("scorer.")}
        try:
            scorer.load_state_dict(weights)
        except RuntimeError:
            raise KVBenchError(
                "lightweight's checkpoint weights do not match its own feature layout (corrupt); train a new one"
            ) from None
        self.scorer = scorer.eval().requires_grad_(False)
        self.layout = layout
        self.flags = artifacts.get("token_flags")

    def method_bytes(self) -> int | None:
        if self.scorer is None:
            return None
        tensors = list(self.scorer.state_dict().values()) + ([self.flags] if self.flags is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _ready(self, observation: Observation) -> lw.Scorer:
        if self.scorer is None:
            raise KVBenchError(
                "lightweight has no scorer loaded; train one with 'kvbench train lightweight --model <model> --out "
                "FILE' and pass lightweight:checkpoint=FILE"
            )
        shape = (observation.num_layers, observation.num_kv_heads, observation.head_dim)
        trained = (self.layout["layers"], self.layout["kv_heads"], self.layout["head_dim"])
        hidden = observation.hidden_states[0].shape[-1] if observation.hidden_states is not None else None
        if shape != trained or (hidden is not None and hidden != self.layout["hidden"]):
            raise KVBenchError(
                f"lightweight's scorer was trained for another model shape (layers, KV heads, head_dim {trained}, "
                f"this model {shape}); train one for it with 'kvbench train lightweight --model <model> --out FILE'"
            )
        if "token_profiling" in self.scorer.features and self.flags is None:
            raise KVBenchError("lightweight's checkpoint holds no token flags; train a new one")
        return self.scorer.to(observation.keys[0].device)

    @torch.no_grad()
    def _compress(self, observation: Observation, budget: float) -> Prefixes:
        n = observation.context_length
        if tokens_for_budget(n, budget) >= n:  # b = 1: the full cache, nothing evicted while decoding either
            return Prefixes(
                [TokenPrefix(k, v, first_position=0) for k, v in zip(observation.keys, observation.values, strict=True)]
            )
        scorer = self._ready(observation)
        n_kept = self._tokens_per_head(observation, budget)
        config = self.config
        prefixes, attns, positions, statics = [], [], [], []
        for layer in range(observation.num_layers):
            attn, static, features = lw.prefill_layer_features(scorer, observation, layer, self.flags)
            scores = scorer(layer, features.to(_dtype(scorer)))
            order = torch.arange(n, device=scores.device)
            guarded = lw.protected_positions(order, n, config.global_tokens, config.recent_window)
            scores = scores.masked_fill(guarded[None], float("inf"))
            kept = top_indices(scores, n_kept).sort(dim=-1).values
            prefixes.append(gather_heads(observation, layer, kept))
            positions.append(kept.to(torch.int32))
            attns.append(attn.gather(1, kept) if attn is not None else None)
            statics.append(
                static.gather(1, kept[..., None].expand(-1, -1, static.shape[-1])) if static is not None else None
            )
        if observation.model is not None:
            install_hooks(observation.model)
        state = LightweightDecodeState(
            attns if "attn_score" in scorer.features else None, positions, statics, observation.scaling
        )
        return Prefixes(prefixes, decode_state=state)

    def _tokens_per_head(self, observation: Observation, budget: float) -> int:
        """The most tokens per head whose keys, values and decode state (`LightweightDecodeState`: per kept token
        and head an int32 position, an fp32 attn_score when selected, F_s fp32 fixed features) fit b of the full
        cache."""
        features = self.scorer.features
        fixed_features = lw.static_dim(features, observation.head_dim, self.layout["hidden"])
        per_head = POSITION_BYTES + FEATURE_BYTES * (int("attn_score" in features) + fixed_features)
        return kv_cost(observation, state_per_head=per_head).kept(self.label, observation.context_length, budget)

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        return cache.method_state is not None

    def on_decode_start(self, cache: KVBenchCache) -> None:
        state = cache.method_state
        if state is None:
            return
        features = self.scorer.features
        state.log = DecodeLog(
            list(range(len(state.positions))), lw.needs_vectors(features), "token_profiling" in features
        )
        cache.recorder = state.log

    @torch.no_grad()
    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """The new tokens' features join the state, every stored token's attn_score takes the new queries' attention,
        then each head evicts down to the size it held when generation began."""
        state = logged_state(cache, self.name)
        if state is None:
            return
        ids = state.log.take_ids() if state.log.ids is not None else None
        for layer, cached in enumerate(cache.layers):
            self._evict(state, layer, cached, ids)

    def _evict(self, state: LightweightDecodeState, layer: int, cached: CompressedLayer, ids) -> None:
        scorer, config = self.scorer, self.config
        queries = state.log.take(layer)
        prefix = cached.prefix.materialize()
        if not prefix.uniform:
            raise RuntimeError("lightweight keeps equal head lengths; its prefix became ragged")
        tail_keys, tail_values = cached.keys[0], cached.values[0]
        if cached.keys.shape[0] != 1:
            raise KVBenchError("lightweight decodes one sequence at a time (batch size 1)")
        new = tail_keys.shape[1]
        if queries.shape[1] != new:
            raise RuntimeError(f"lightweight saw {queries.shape[1]} new queries for {new} new tokens in layer {layer}")
        keys = torch.cat([prefix.keys, tail_keys.to(prefix.keys.dtype)], dim=1)
        values = torch.cat([prefix.values, tail_values.to(prefix.values.dtype)], dim=1)
        heads = keys.shape[0]
        seen = cached.get_seq_length()
        latest = torch.arange(seen - new, seen, dtype=torch.int32, device=keys.device).expand(heads, -1)
        positions = torch.cat([state.positions[layer], latest], dim=1)
        attn = None
        if state.attn is not None:
            attention = decode_attention(queries, keys, state.scaling).mean(dim=1)
            attn = torch.cat([state.attn[layer], attention.new_zeros(heads, new)], dim=1)
            attn = lw.update_attn_score(attn, positions, attention, list(range(seen - new, seen)))
        static = state.static[layer]
        if static is not None:
            hidden = state.log.take_hidden(layer) if state.log.hidden is not None else None
            flags = self.flags[ids].to(keys.device) if ids is not None else None
            fresh = lw.static_features(scorer, layer, tail_keys, tail_values, queries, hidden, flags)
            static = torch.cat([static, fresh], dim=1)
        if state.size is None:
            state.size = keys.shape[1] - 1
        if keys.shape[1] > state.size:
            features = lw.assemble(scorer.features, attn, positions, seen - 1, static)
            scores = scorer(layer, features.to(_dtype(scorer)))
            guarded = lw.protected_positions(positions, seen, config.global_tokens, config.recent_window)
            scores = scores.masked_fill(guarded, float("inf"))
            keep = top_indices(scores, state.size).sort(dim=-1).values
            index = keep[..., None].expand(-1, -1, keys.shape[-1])
            keys, values = keys.gather(1, index), values.gather(1, index)
            positions = positions.gather(1, keep)
            attn = attn.gather(1, keep) if attn is not None else None
            static = static.gather(1, keep[..., None].expand(-1, -1, static.shape[-1])) if static is not None else None
        state.positions[layer] = positions
        if state.attn is not None:
            state.attn[layer] = attn
        state.static[layer] = static
        cached.absorb_tail(TokenPrefix(keys, values))


def _dtype(scorer: lw.Scorer) -> torch.dtype:
    return next(scorer.parameters()).dtype


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(value) if isinstance(value, list) else str(value)

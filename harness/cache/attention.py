"""kvbench's attention function, registered with `transformers.AttentionInterface` as "kvbench".

The model's own attention modules project, rotate and call `cache.update`; this function receives the
tail keys/values from that update and finds the layer's compressed prefix through the `kvbench_cache`
keyword that kvbench passes to the model's forward. It applies everything the model's attention module asks
of its attention function (`LayerAttention`: the scaling, a sliding window measured in original positions,
logit soft-capping, attention sinks), so `full` through kvbench is the model's own attention.

With no prefix (a fresh prefill) and nothing beyond a causal softmax it is transformers' SDPA path, so the
prefill is bit-identical to plain transformers. Over a token prefix of equal-length heads under a plain softmax
with no bias (`full`, and every uniform eviction) it is the SDPA call transformers makes over its own cache, over
one view of the layer's room, where the prefix was copied once ahead of the tail (`CompressedLayer.joint`): no
per-step copy (transformers' DynamicCache concatenates the whole cache every step). A decompressed uniform prefix
(kivi, low rank, the autoencoder's latents: a fresh tensor every step anyway) is concatenated with its tail for that
SDPA call (`CONCATENATE_BELOW`: the copy-free log-sum-exp join drifts past the 1e-5 that b = 1 = `full`
promises). Every other
layout (a logit bias, ragged heads, soft-capping, sinks) takes one fp32 softmax over prefix and tail per layer,
query heads grouped per KV head (never expanded), the prefix and the tail read where they lie: nothing is
concatenated, so such a decode step copies no part of the context. Ragged heads stay packed ([Σ n_h, d] + lengths): one masked product
over all heads on CUDA, one product per head on the CPU (`set_ragged_mode`; benchmarks/ragged_decode.py measures
both).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvbench.harness.cache.batched import BatchedCache
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import PrefixKV
from kvbench.harness.errors import KVBenchError, Unsupported

ATTENTION_NAME = "kvbench"

# Keywords with which transformers' attention modules ask for something kvbench's attention does not do (an
# additive position bias, sparse index sets, packed sequences, sinks under another name): refused when set.
_NOT_APPLIED = frozenset(
    {"position_bias", "indices", "block_indices", "sinks", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q"}
)


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention applies beyond softmax(q·kᵀ): as its attention module passes it.

    scaling: the softmax scale (the model's: 1/√d, or 1/√query_pre_attn_scalar, ...).
    window: a sliding window W: a key at original position p is seen from position q iff q − W < p ≤ q.
    softcap: logits become softcap·tanh(logits/softcap) before any bias or mask (Gemma2).
    sinks: one learned logit per query head that joins every softmax and takes its share of the probability,
        with no value (GPT-OSS).
    """

    scaling: float
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def plain_softmax(self) -> bool:
        """No cap and no sinks: SDPA computes it (a window is only a mask)."""
        return self.softcap is None and self.sinks is None

    @classmethod
    def of_call(
        cls, module: torch.nn.Module, query: torch.Tensor, mask: object, scaling: float | None, kwargs: dict
    ) -> LayerAttention:
        """What the model's attention module asked for; one line for what kvbench cannot apply."""
        unapplied = sorted(name for name in _NOT_APPLIED if kwargs.get(name) is not None)
        if mask is not None:
            unapplied.append("an attention mask of its own")
        if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
            unapplied.append("non-causal attention")
        if unapplied:
            raise KVBenchError(
                f"{type(module).__name__} asks its attention for {', '.join(unapplied)}, which kvbench's attention "
                "does not apply; this model cannot be served exactly"
            )
        window = kwargs.get("sliding_window")
        softcap = kwargs.get("softcap")
        sinks = kwargs.get("s_aux")
        return cls(
            scaling=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
            window=int(window) if window is not None else None,
            softcap=float(softcap) if softcap is not None else None,
            sinks=sinks.detach() if sinks is not None else None,
        )

    def logits(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scaled (and capped) logits of query rows [..., m, d] against keys [..., n, d]."""
        return self.cap((query @ keys.transpose(-1, -2)) * self.scaling)

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft-capping of scaled logits (the identity without a cap)."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def probabilities(self, logits: torch.Tensor, sink_logits: torch.Tensor | None) -> torch.Tensor:
        """softmax over the last dimension in fp32, with the sinks' logits (one per row, [..., m]) in the
        denominator and their columns dropped."""
        if sink_logits is None:
            return torch.softmax(logits, dim=-1, dtype=torch.float32)
        joined = torch.cat([logits, sink_logits.to(logits.dtype).unsqueeze(-1)], dim=-1)
        return torch.softmax(joined, dim=-1, dtype=torch.float32)[..., :-1]


@dataclass(frozen=True)
class Positions:
    """Original positions of the query rows and of the keys a layer attends to, to build its visibility.

    queries: [m]; tail: [t] (the tail's keys); prefix: [n] when the prefix is a contiguous run of positions
    (None: the representation does not say which positions it kept)."""

    queries: torch.Tensor
    tail: torch.Tensor
    prefix: torch.Tensor | None

    def tail_visible(self, window: int | None) -> torch.Tensor:
        seen = self.tail[None, :] <= self.queries[:, None]
        if window is not None:
            seen &= self.tail[None, :] > self.queries[:, None] - window
        return seen

    def prefix_visible(self, window: int | None, layer: int) -> torch.Tensor | None:
        """[m, n] which prefix keys each query sees; None when it sees them all."""
        if window is None or int(self.queries.max()) < window:  # no context position is outside any window
            return None
        if self.prefix is None:  # refused for this cell (a sweep records it and goes on)
            raise Unsupported(
                f"layer {layer}'s sliding window of {window} tokens no longer covers the compressed context at "
                f"position {int(self.queries.max())}, and the method's representation does not record which "
                "positions it kept; shorten the answer or use a method that keeps positions"
            )
        return self.prefix[None, :] > self.queries[:, None] - window


def layer_positions(
    prefix_length: int, tail_length: int, query_length: int, prefix: torch.Tensor | None, device
) -> Positions:
    """Positions for a layer whose cache covers `prefix_length` context positions (its prefix entries at the
    positions `prefix`, when known) and a tail of `tail_length` tokens, the last `query_length` of which are the
    queries."""
    tail = torch.arange(prefix_length, prefix_length + tail_length, device=device)
    return Positions(tail[tail_length - query_length :], tail, prefix)


def _sink_rows(attention: LayerAttention, h_kv: int, group: int, length: int) -> torch.Tensor | None:
    """The sinks' logit for every row of the grouped layout [h_kv, group · length] (None without sinks)."""
    if attention.sinks is None:
        return None
    return attention.sinks.reshape(h_kv, group, 1).expand(h_kv, group, length).reshape(h_kv, group * length)


# How ragged heads attend: "packed" is one product of every query row with the packed keys of all heads under a
# head-block mask (one call per layer, H_kv× the multiply-adds of the heads' own products: what a GPU wants, where
# launches cost more than arithmetic); "loop" is one product per KV head (fewer operations: faster on a CPU with
# few heads, see benchmarks/ragged_decode.py). "auto" picks packed on CUDA and the loop elsewhere.
RAGGED_MODES = ("auto", "packed", "loop")
_ragged_mode = "auto"
# Keys (prefix + tail) below which a plain softmax over an unbiased equal-length prefix that is not joined to its
# tail's room (a decompressed one) is one SDPA call over their concatenation, as transformers makes it over its own
# cache: b = 1 then equals `full` within 1e-5. Above it the prefix is read where it lies and the two fused calls
# are joined by their log-sum-exps, which saves the copy but drifts from transformers (2.6e-5 in SmolLM2-135M's
# logits at ~1k tokens, 1.0e-5 on a 40-token gemma3): so no cache is above it by default. (Token prefixes are
# joined instead, `CompressedLayer.joint`: exact and copy-free.) Tests lower it to 0 to cover the fused path.
CONCATENATE_BELOW = math.inf
# Query rows × stored keys above which a call is split into chunks of query positions (fp32 logits of ~64 MB).
_CHUNK_ELEMENTS = 1 << 24


def set_ragged_mode(mode: str) -> str:
    """Choose how ragged heads attend (RAGGED_MODES); returns the previous mode."""
    global _ragged_mode
    if mode not in RAGGED_MODES:
        raise ValueError(f"ragged attention mode must be one of {', '.join(RAGGED_MODES)}, not {mode!r}")
    previous, _ragged_mode = _ragged_mode, mode
    return previous


def _packed_on(device: torch.device) -> bool:
    return _ragged_mode == "packed" or (_ragged_mode == "auto" and device.type == "cuda")


def _softmax_pieces(
    pieces: list[torch.Tensor], sink_rows: torch.Tensor | None, dtype: torch.dtype
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One softmax over the concatenation of logit blocks [..., n_i] (rows aligned), without concatenating them:
    each block's exp(logit − row max) in `dtype`, and the rows' 1/denominator [..., 1] in fp32 (the sinks' logits,
    [...] one per row, join the denominator only). The caller multiplies the weighted sum of values by it, as
    SDPA's kernels normalize at the end."""
    pieces = [p.float() for p in pieces]
    top = torch.stack([p.amax(dim=-1) for p in pieces if p.shape[-1]]).amax(dim=0)
    if sink_rows is not None:
        top = torch.maximum(top, sink_rows.float())
    exps = [(p - top.unsqueeze(-1)).exp_() for p in pieces]
    total = sum(e.sum(dim=-1) for e in exps)
    if sink_rows is not None:
        total = total + (sink_rows.float() - top).exp()
    return [e.to(dtype) for e in exps], total.reciprocal_().unsqueeze(-1)


def _tail_logits(q: torch.Tensor, tail_k: torch.Tensor, tail_seen: torch.Tensor, attention: LayerAttention):
    return attention.logits(q, tail_k.to(q.dtype)).masked_fill(~tail_seen, float("-inf"))


# SDPA's CPU kernel with its log-sum-exp (a private ATen op): where a torch build lacks it, the unfused path runs.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_piece(q, keys, values, seen, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU's fused SDPA kernel over one block of keys: output [H, R, d] and log-sum-exp [H, R] of q [H, R, d]
    (every row sees at least one key where `seen` [R, n] hides some)."""
    mask = None
    if seen is not None and not bool(seen.all()):
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))[None, None]
    out, lse = _CPU_FLASH(q[None], keys[None], values[None], 0.0, False, attn_mask=mask, scale=scaling)
    return out[0], lse[0]


def _attend_fused(q, tail_k, tail_v, tail_seen, attention, prefix, pre_seen) -> torch.Tensor | None:
    """A plain softmax over an unbiased prefix on the CPU: SDPA's own kernel over the prefix where it lies and over
    the tail, the two joined by their log-sum-exps: the same kernel (and its exp) as the single SDPA call
    transformers makes over a concatenated cache, without the concatenation. None where some rows see prefix keys
    and others none (the caller computes those)."""
    dtype = q.dtype
    tail_out, tail_lse = _fused_piece(q, tail_k.to(dtype), tail_v.to(dtype), tail_seen, attention.scaling)
    rows_seeing = None if pre_seen is None else pre_seen.any(dim=-1)
    if prefix is None or prefix.keys.shape[-2] == 0 or (rows_seeing is not None and not bool(rows_seeing.any())):
        return tail_out
    if rows_seeing is not None and not bool(rows_seeing.all()):
        return None
    keys, values = prefix.keys.to(dtype), prefix.values.to(dtype)
    pre_out, pre_lse = _fused_piece(q, keys, values, pre_seen, attention.scaling)
    lse = torch.logaddexp(pre_lse, tail_lse)
    pre_weight, tail_weight = (pre_lse - lse).exp().unsqueeze(-1), (tail_lse - lse).exp().unsqueeze(-1)
    return (pre_out.float() * pre_weight + tail_out.float() * tail_weight).to(dtype)


def _attend_uniform(q, tail_k, tail_v, tail_seen, attention, sinks, prefix, pre_seen) -> torch.Tensor:
    """q [H_kv, R, d] over a prefix of equal-length heads [H_kv, n, d] (bias [H_kv, n]) and the tail, read where
    they lie: one batched product per block, one softmax over both (on the CPU, a plain softmax over an unbiased
    prefix runs SDPA's fused kernel per block instead)."""
    fused = _CPU_FLASH is not None and q.device.type == "cpu"
    if fused and attention.plain_softmax and (prefix is None or prefix.bias is None):
        out = _attend_fused(q, tail_k, tail_v, tail_seen, attention, prefix, pre_seen)
        if out is not None:
            return out
    tail_logits = _tail_logits(q, tail_k, tail_seen, attention)
    if prefix is None or prefix.keys.shape[-2] == 0:
        (weights,), scale = _softmax_pieces([tail_logits], sinks, q.dtype)
        return ((weights @ tail_v.to(q.dtype)) * scale).to(q.dtype)
    keys, values = prefix.keys.to(q.dtype), prefix.values.to(q.dtype)
    pre_logits = attention.logits(q, keys)
    if prefix.bias is not None:
        pre_logits = pre_logits + prefix.bias.unsqueeze(-2).to(pre_logits.dtype)
    if pre_seen is not None:
        pre_logits = pre_logits.masked_fill(~pre_seen, float("-inf"))
    (pre, tail), scale = _softmax_pieces([pre_logits, tail_logits], sinks, q.dtype)
    return ((pre @ values + tail @ tail_v.to(q.dtype)) * scale).to(q.dtype)


def _attend_packed(q, tail_k, tail_v, tail_seen, attention, sinks, prefix) -> torch.Tensor:
    """q [H_kv, R, d] over ragged heads packed [Σ n_h, d] (bias [Σ n_h], lengths [H_kv]) and the tail [H_kv, t, d],
    with the prefix read where it lies: one product of all H_kv·R rows with all packed keys, each row's other heads
    masked out, one softmax with the tail, one product with the packed values."""
    h_kv, rows, dim = q.shape
    tail_logits = _tail_logits(q, tail_k, tail_seen, attention)
    lengths = prefix.lengths.to(device=q.device, dtype=torch.long)
    head_of_key = torch.repeat_interleave(torch.arange(h_kv, device=q.device), lengths)
    pre_logits = attention.logits(q.reshape(h_kv * rows, dim), prefix.keys.to(q.dtype)).view(h_kv, rows, -1)
    if prefix.bias is not None:
        pre_logits = pre_logits + prefix.bias.to(pre_logits.dtype)
    other_head = head_of_key[None, None, :] != torch.arange(h_kv, device=q.device)[:, None, None]
    pre_logits = pre_logits.masked_fill(other_head, float("-inf"))
    (pre, tail), scale = _softmax_pieces([pre_logits, tail_logits], sinks, q.dtype)
    out = (pre.view(h_kv * rows, -1) @ prefix.values.to(q.dtype)).view(h_kv, rows, dim)
    return ((out + tail @ tail_v.to(q.dtype)) * scale).to(q.dtype)


def _attend_loop(q, tail_k, tail_v, tail_seen, attention, sinks, prefix) -> torch.Tensor:
    """The packed ragged heads one KV head at a time (views of the packed tensors, nothing copied)."""
    sizes = prefix.lengths.tolist()
    keys, values = prefix.keys.split(sizes), prefix.values.split(sizes)
    biases = prefix.bias.split(sizes) if prefix.bias is not None else [None] * len(sizes)
    heads = []
    for h in range(q.shape[0]):
        head = PrefixKV(keys[h][None], values[h][None], None if biases[h] is None else biases[h][None])
        heads.append(
            _attend_uniform(
                q[h : h + 1],
                tail_k[h : h + 1],
                tail_v[h : h + 1],
                tail_seen,
                attention,
                sinks[h : h + 1] if sinks is not None else None,
                head,
                None,
            )
        )
    return torch.cat(heads)


def packed(prefix: PrefixKV) -> PrefixKV:
    """A ragged PrefixKV (per-head lists) as its packed form ([Σ n_h, d] + lengths); others as they are."""
    if prefix.uniform or prefix.lengths is not None:
        return prefix
    lengths = torch.tensor([int(k.shape[0]) for k in prefix.keys], dtype=torch.int32)
    bias = torch.cat(list(prefix.bias)) if prefix.bias is not None else None
    return PrefixKV(torch.cat(list(prefix.keys)), torch.cat(list(prefix.values)), bias, lengths)


def attend_compressed(
    query: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    prefix: PrefixKV | None,
    attention: LayerAttention | float,
    positions: Positions | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """query [Hq, L, d]; tail [Hkv, t, d] → output [Hq, L, d]. Query heads are grouped per KV head and never
    expanded; prefix and tail are read where they lie (never concatenated). A prefix is uniform ([H, n, d]),
    packed ragged ([Σ n_h, d] + lengths) or per-head lists (packed here, a copy). Without `positions` the queries
    are the last L tail tokens and the window, if any, covers everything."""
    if not isinstance(attention, LayerAttention):
        attention = LayerAttention(float(attention))
    h_q, length, dim = query.shape
    h_kv, tail_length = tail_k.shape[0], tail_k.shape[1]
    group = h_q // h_kv
    if positions is None:
        positions = layer_positions(0, tail_length, length, None, query.device)
    if prefix is not None:
        prefix = packed(prefix)
    stored = 0 if prefix is None else int(prefix.keys.shape[-2]) * (1 if prefix.uniform else h_kv)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, h_q * (stored + tail_length)))
    if length > chunk:  # query positions are independent: bound the logits' size
        parts = []
        for start in range(0, length, chunk):
            part = Positions(positions.queries[start : start + chunk], positions.tail, positions.prefix)
            parts.append(
                attend_compressed(query[:, start : start + chunk], tail_k, tail_v, prefix, attention, part, layer)
            )
        return torch.cat(parts, dim=1)
    # Rows of one KV head: its `group` query heads × L positions; the masks repeat per head.
    q = query.reshape(h_kv, group * length, dim)
    tail_seen = positions.tail_visible(attention.window).repeat(group, 1)
    sinks = _sink_rows(attention, h_kv, group, length)
    if prefix is None or prefix.uniform:
        pre_seen = positions.prefix_visible(attention.window, layer) if prefix is not None else None
        pre_seen = pre_seen.repeat(group, 1) if pre_seen is not None else None
        out = _attend_uniform(q, tail_k, tail_v, tail_seen, attention, sinks, prefix, pre_seen)
    else:
        if positions.prefix_visible(attention.window, layer) is not None:  # ragged prefixes record no positions
            raise Unsupported(f"layer {layer}: a window over a ragged prefix needs its positions")
        attend = _attend_packed if _packed_on(query.device) else _attend_loop
        out = attend(q, tail_k, tail_v, tail_seen, attention, sinks, prefix)
    return out.reshape(h_q, length, dim)


def kvbench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvbench_cache: KVBenchCache | BatchedCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if kvbench_cache is None:
        raise RuntimeError(
            "the kvbench attention runs only inside kvbench's prefill and decode (kvbench_cache missing)"
        )
    attention = LayerAttention.of_call(module, query, attention_mask, scaling, kwargs)
    if isinstance(kvbench_cache, BatchedCache):
        for row in kvbench_cache.rows:
            row.attention[module.layer_idx] = attention
        return _attend_rows(module, query, kvbench_cache, attention), None
    if query.shape[0] != 1:
        raise ValueError("a KVBenchCache holds one sequence; decode several through a BatchedCache")
    kvbench_cache.attention[module.layer_idx] = attention
    return _attend_row(module, query, key, value, kvbench_cache, attention)


def _row_positions(layer, query_length: int, prefix: PrefixKV | None, device) -> Positions:
    """A cache layer's positions: its prefix's are known when it is empty or a contiguous run (`first_position`:
    the whole context, a sliding window's last tokens), unknown for what a method selected or merged."""
    if prefix is None:
        known = torch.zeros(0, device=device)
    elif layer.first_position is not None and prefix.uniform:
        known = torch.arange(layer.first_position, layer.first_position + prefix.keys.shape[1], device=device)
    else:
        known = None
    return layer_positions(layer.prefix_length, layer.tail_length, query_length, known, device)


def _attend_rows(
    module: torch.nn.Module, query: torch.Tensor, batch: BatchedCache, attention: LayerAttention
) -> torch.Tensor:
    """Each row of a batch over its own prefix and tail (the tail its update just grew), read where they lie; only
    the projections and the MLP around this call see the rows as one batch. (Stacking the rows' prefixes for one
    call would copy every prefix on every step.)"""
    index = module.layer_idx
    outputs = []
    for b, row in enumerate(batch.rows):
        layer = row.layers[index]
        outputs.append(_attend_row(module, query[b : b + 1], layer.keys, layer.values, row, attention)[0][0])
    return torch.stack(outputs)


def _attend_row(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: KVBenchCache,
    attention: LayerAttention,
) -> tuple[torch.Tensor, None]:
    """One sequence: query [1, Hq, L, d] over its cache's prefix and its tail key/value [1, Hkv, t, d].

    A fresh prefill (no prefix, a causal softmax) is transformers' own SDPA call, and so is a plain softmax over an
    unbiased equal-length prefix (a token prefix joined to the tail in its room, read as one view; a decompressed
    one concatenated: `CONCATENATE_BELOW`); everything else reads the layer's
    prefix (decompressed for this layer only, dropped on return) and tail where they lie."""
    index = module.layer_idx
    layer = cache.layers[index]
    fresh_prefill = layer.prefix is None and key.shape[2] == query.shape[2] and layer.prefix_length == 0
    if cache.recorder is not None:
        cache.recorder.observe(index, query, key, attention.scaling)
    if fresh_prefill and attention.plain_softmax and attention.window is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=attention.scaling)
    prefix = layer.prefix.attention_inputs() if layer.prefix is not None else None
    positions = _row_positions(layer, query.shape[2], prefix, query.device)
    if prefix is None and attention.plain_softmax:
        return _sdpa_over_prefix(module, query, key, value, 0, attention, positions)
    joint = layer.joint()
    if joint is not None and attention.plain_softmax:  # prefix and tail in one room: one SDPA call, no copy
        return _sdpa_over_prefix(module, query, *joint, layer.joined, attention, positions)
    if (
        attention.plain_softmax
        and prefix.uniform
        and prefix.bias is None
        and prefix.keys.shape[1] + key.shape[2] < CONCATENATE_BELOW
    ):
        key = torch.cat([prefix.keys[None].to(key.dtype), key], dim=2)
        value = torch.cat([prefix.values[None].to(value.dtype), value], dim=2)
        return _sdpa_over_prefix(module, query, key, value, prefix.keys.shape[1], attention, positions)
    out = attend_compressed(query[0], key[0], value[0], prefix, attention, positions, index)
    return out.transpose(0, 1).unsqueeze(0), None


def _sdpa_over_prefix(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_length: int,
    attention: LayerAttention,
    positions: Positions,
) -> tuple[torch.Tensor, None]:
    """Keys/values in one tensor under a plain softmax (a prefill under a window; a short prefix joined to its tail,
    `CONCATENATE_BELOW`): the SDPA call transformers would make, a mask built only where some key is hidden from
    some query."""
    query_length = query.shape[2]
    tail_seen = positions.tail_visible(attention.window)
    pre_seen = positions.prefix_visible(attention.window, getattr(module, "layer_idx", 0))
    mask = None
    if query_length > 1 or pre_seen is not None or not bool(tail_seen.all()):
        if pre_seen is None:
            pre_seen = torch.ones(query_length, prefix_length, dtype=torch.bool, device=query.device)
        mask = torch.cat([pre_seen, tail_seen], dim=-1)[None, None]
    return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=attention.scaling)


AttentionInterface.register(ATTENTION_NAME, kvbench_attention)


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Route the model's attention through the registered attention function `name` for the duration, restoring
    the user's choice after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def kvbench_attention_enabled(model: torch.nn.Module):
    """Route the model's attention through kvbench for the duration, restoring the user's choice after."""
    return attention_implementation(model, ATTENTION_NAME)

"""kvbench's attention function, registered with `transformers.AttentionInterface` as "kvbench".

The model's own attention modules project, rotate and call `cache.update`; this function receives the
tail keys/values from that update and finds the layer's compressed prefix through the `kvbench_cache`
keyword that kvbench passes to the model's forward. It applies everything the model's attention module asks
of its attention function (`LayerAttention`: the scaling, a sliding window measured in original positions,
logit soft-capping, attention sinks), so `full` through kvbench is the model's own attention.

With no prefix (a fresh prefill) and nothing beyond a causal softmax it is transformers' SDPA path, so the
prefill is bit-identical to plain transformers. Over a compressed prefix with equal head lengths and no bias it
makes the SDPA call a plain cache would make (a window becomes its mask); ragged heads, a logit bias, soft-capping
or sinks take one softmax over prefix (plus bias) and tail per KV head, never expanded to query heads.
"""

from __future__ import annotations

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


def _joint_softmax(
    q: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_seen: torch.Tensor,
    attention: LayerAttention,
    sink_rows: torch.Tensor | None,
    pre_k: torch.Tensor | None,
    pre_v: torch.Tensor | None,
    pre_bias: torch.Tensor | None,
    pre_seen: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of q [..., m, d] over prefix [..., n, d] and tail [..., t, d] under one softmax; `*_seen` are
    [m, n] / [m, t] visibility masks (None: everything seen)."""
    tail_logits = attention.logits(q, tail_k).masked_fill(~tail_seen, float("-inf"))
    if pre_k is None or pre_k.shape[-2] == 0:
        probs = attention.probabilities(tail_logits, sink_rows).to(q.dtype)
        return probs @ tail_v
    pre_logits = attention.logits(q, pre_k)
    if pre_bias is not None:
        pre_logits = pre_logits + pre_bias.unsqueeze(-2).to(pre_logits.dtype)
    if pre_seen is not None:
        pre_logits = pre_logits.masked_fill(~pre_seen, float("-inf"))
    probs = attention.probabilities(torch.cat([pre_logits, tail_logits], dim=-1), sink_rows).to(q.dtype)
    n = pre_k.shape[-2]
    return probs[..., :n] @ pre_v + probs[..., n:] @ tail_v


def attend_compressed(
    query: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    prefix: PrefixKV | None,
    attention: LayerAttention | float,
    positions: Positions | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """query [Hq, L, d]; tail [Hkv, t, d] → output [Hq, L, d]. Query heads are grouped per KV head. Without
    `positions` the queries are the last L tail tokens and the window, if any, covers everything."""
    if not isinstance(attention, LayerAttention):
        attention = LayerAttention(float(attention))
    h_q, length, dim = query.shape
    h_kv, tail_length = tail_k.shape[0], tail_k.shape[1]
    group = h_q // h_kv
    if positions is None:
        positions = layer_positions(0, tail_length, length, None, query.device)
    # Rows of one KV head: its `group` query heads × L positions; the masks repeat per head.
    q = query.reshape(h_kv, group * length, dim)
    tail_seen = positions.tail_visible(attention.window).repeat(group, 1)
    pre_seen = positions.prefix_visible(attention.window, layer) if prefix is not None else None
    pre_seen = pre_seen.repeat(group, 1) if pre_seen is not None else None
    sinks = _sink_rows(attention, h_kv, group, length)
    if prefix is None or prefix.uniform:
        keys = values = bias = None
        if prefix is not None:
            keys, values, bias = prefix.keys, prefix.values, prefix.bias
        out = _joint_softmax(q, tail_k, tail_v, tail_seen, attention, sinks, keys, values, bias, pre_seen)
    else:
        heads = []
        for h in range(h_kv):
            bias = prefix.bias[h] if prefix.bias is not None else None
            heads.append(
                _joint_softmax(
                    q[h],
                    tail_k[h],
                    tail_v[h],
                    tail_seen,
                    attention,
                    sinks[h] if sinks is not None else None,
                    prefix.keys[h],
                    prefix.values[h],
                    bias,
                    pre_seen,
                )
            )
        out = torch.stack(heads)
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
    """Each row of a batch over its own prefix and tail (the tail its update just grew); only the projections and
    the MLP around this call see the rows as one batch. Rows whose prefixes are uniform and unbiased with as many
    tokens, whose tails are as long and whose attention is a plain softmax that every key is visible to, share one
    SDPA call over a [G, H, n + t, d] stack made for the call only (as the unbatched path concatenates prefix and
    tail for its call); every other row attends alone."""
    index = module.layer_idx
    outputs: list[torch.Tensor | None] = [None] * len(batch.rows)
    groups: dict[tuple, list[tuple[int, PrefixKV]]] = {}
    for b, row in enumerate(batch.rows):
        layer = row.layers[index]
        tail_keys = layer.keys
        if layer.prefix is None:
            outputs[b] = _attend_row(module, query[b : b + 1], tail_keys, layer.values, row, attention)[0][0]
            continue
        if row.recorder is not None:
            row.recorder.observe(index, query[b : b + 1], tail_keys, attention.scaling)
        prefix = layer.prefix.materialize()
        positions = _row_positions(layer, query.shape[2], prefix, query.device)
        shared = attention.plain_softmax and positions.prefix_visible(attention.window, index) is None
        if shared and prefix.uniform and prefix.bias is None:
            shape = (prefix.keys.shape[1], tail_keys.shape[2], prefix.keys.dtype)
            groups.setdefault(shape, []).append((b, prefix))
        else:
            out = attend_compressed(query[b], tail_keys[0], layer.values[0], prefix, attention, positions, index)
            outputs[b] = out.transpose(0, 1)
    for (prefix_length, _, _), members in groups.items():
        rows = [b for b, _ in members]
        tails = [batch.rows[b].layers[index] for b in rows]
        dtype = tails[0].keys.dtype
        keys = torch.cat(
            [torch.stack([prefix.keys for _, prefix in members]).to(dtype), torch.cat([t.keys for t in tails])], dim=2
        )
        values = torch.cat(
            [torch.stack([prefix.values for _, prefix in members]).to(dtype), torch.cat([t.values for t in tails])],
            dim=2,
        )
        positions = _row_positions(tails[0], query.shape[2], members[0][1], query.device)
        out = _sdpa_over_prefix(module, query[rows], keys, values, prefix_length, attention, positions)[0]
        for j, b in enumerate(rows):
            outputs[b] = out[j]
    return torch.stack(outputs)


def _attend_row(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: KVBenchCache,
    attention: LayerAttention,
) -> tuple[torch.Tensor, None]:
    """One sequence: query [1, Hq, L, d] over its cache's prefix and its tail key/value [1, Hkv, t, d]."""
    index = module.layer_idx
    layer = cache.layers[index]
    fresh_prefill = layer.prefix is None and key.shape[2] == query.shape[2] and layer.prefix_length == 0
    if cache.recorder is not None:
        cache.recorder.observe(index, query, key, attention.scaling)
    if fresh_prefill and attention.plain_softmax and attention.window is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=attention.scaling)
    prefix = layer.prefix.materialize() if layer.prefix is not None else None
    positions = _row_positions(layer, query.shape[2], prefix, query.device)
    if attention.plain_softmax and (prefix is None or (prefix.uniform and prefix.bias is None)):
        n_prefix = 0
        if prefix is not None:
            n_prefix = prefix.keys.shape[1]
            key = torch.cat([prefix.keys[None].to(key.dtype), key], dim=2)
            value = torch.cat([prefix.values[None].to(value.dtype), value], dim=2)
        return _sdpa_over_prefix(module, query, key, value, n_prefix, attention, positions)
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
    """Equal-length heads without bias under a plain softmax: the same SDPA call a plain transformers cache would
    make.

    Keys are [prefix; tail] exactly as a dynamic cache would hold them when nothing was dropped, so the
    `full` method reproduces plain generation bit for bit; the caller concatenates them for this call only. A
    mask is built only where some key is hidden from some query (the causal tail of several queries, a window).
    """
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

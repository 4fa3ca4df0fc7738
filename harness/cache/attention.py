"""kvbench's attention function, registered with `transformers.AttentionInterface` as "kvbench".

The model's own attention modules project, rotate and call `cache.update`; this function receives the
tail keys/values from that update and finds the layer's compressed prefix through the `kvbench_cache`
keyword that kvbench passes to the model's forward. With no prefix (a fresh prefill) it is transformers'
SDPA path, so the prefill is bit-identical to plain transformers. Over a compressed prefix with equal
head lengths and no bias it makes the SDPA call a plain cache would make; ragged heads or a logit bias
take one softmax over prefix (plus bias) and causal tail per KV head, never expanded to query heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvbench.harness.cache.batched import BatchedCache
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import PrefixKV

ATTENTION_NAME = "kvbench"


def _tail_mask(query_length: int, tail_length: int, device: torch.device) -> torch.Tensor:
    """True where query i (the last `query_length` tail tokens) may not see tail position j."""
    rows = torch.arange(query_length, device=device)[:, None] + (tail_length - query_length)
    return torch.arange(tail_length, device=device)[None, :] > rows


def _joint_softmax(
    q: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    masked: torch.Tensor,
    scaling: float,
    pre_k: torch.Tensor | None,
    pre_v: torch.Tensor | None,
    pre_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of q [..., m, d] over prefix [..., n, d] and tail [..., t, d] under one softmax."""
    tail_logits = (q @ tail_k.transpose(-1, -2)) * scaling
    tail_logits = tail_logits.masked_fill(masked, float("-inf"))
    if pre_k is None or pre_k.shape[-2] == 0:
        probs = torch.softmax(tail_logits, dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ tail_v
    pre_logits = (q @ pre_k.transpose(-1, -2)) * scaling
    if pre_bias is not None:
        pre_logits = pre_logits + pre_bias.unsqueeze(-2).to(pre_logits.dtype)
    probs = torch.softmax(torch.cat([pre_logits, tail_logits], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    n = pre_k.shape[-2]
    return probs[..., :n] @ pre_v + probs[..., n:] @ tail_v


def attend_compressed(
    query: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, prefix: PrefixKV | None, scaling: float
) -> torch.Tensor:
    """query [Hq, L, d]; tail [Hkv, t, d] → output [Hq, L, d]. Query heads are grouped per KV head."""
    h_q, length, dim = query.shape
    h_kv, tail_length = tail_k.shape[0], tail_k.shape[1]
    group = h_q // h_kv
    # Rows of one KV head: its `group` query heads × L positions; the causal mask repeats per head.
    q = query.reshape(h_kv, group * length, dim)
    masked = _tail_mask(length, tail_length, query.device).repeat(group, 1)
    if prefix is None or prefix.uniform:
        keys = values = bias = None
        if prefix is not None:
            keys, values, bias = prefix.keys, prefix.values, prefix.bias
        out = _joint_softmax(q, tail_k, tail_v, masked, scaling, keys, values, bias)
    else:
        heads = []
        for h in range(h_kv):
            bias = prefix.bias[h] if prefix.bias is not None else None
            heads.append(
                _joint_softmax(q[h], tail_k[h], tail_v[h], masked, scaling, prefix.keys[h], prefix.values[h], bias)
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
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(kvbench_cache, BatchedCache):
        return _attend_rows(module, query, kvbench_cache, scaling), None
    if query.shape[0] != 1:
        raise ValueError("a KVBenchCache holds one sequence; decode several through a BatchedCache")
    return _attend_row(module, query, key, value, kvbench_cache, scaling)


def _attend_rows(module: torch.nn.Module, query: torch.Tensor, batch: BatchedCache, scaling: float) -> torch.Tensor:
    """Each row of a batch over its own prefix and tail (the tail its update just grew); only the projections and
    the MLP around this call see the rows as one batch. Rows whose prefixes are uniform and unbiased with as many
    tokens, and whose tails are as long, share one SDPA call over a [G, H, n + t, d] stack made for the call only
    (as the unbatched path concatenates prefix and tail for its call); every other row attends alone."""
    index = module.layer_idx
    outputs: list[torch.Tensor | None] = [None] * len(batch.rows)
    groups: dict[tuple, list[tuple[int, PrefixKV]]] = {}
    for b, row in enumerate(batch.rows):
        layer = row.layers[index]
        tail_keys = layer.keys
        if layer.prefix is None:
            outputs[b] = _attend_row(module, query[b : b + 1], tail_keys, layer.values, row, scaling)[0][0]
            continue
        if row.recorder is not None:
            row.recorder.observe(index, query[b : b + 1], tail_keys, scaling)
        prefix = layer.prefix.materialize()
        if prefix.uniform and prefix.bias is None:
            shape = (prefix.keys.shape[1], tail_keys.shape[2], prefix.keys.dtype)
            groups.setdefault(shape, []).append((b, prefix))
        else:
            out = attend_compressed(query[b], tail_keys[0], layer.values[0], prefix, scaling)
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
        out = _sdpa_over_prefix(module, query[rows], keys, values, prefix_length, scaling)[0]
        for j, b in enumerate(rows):
            outputs[b] = out[j]
    return torch.stack(outputs)


def _attend_row(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: KVBenchCache,
    scaling: float,
) -> tuple[torch.Tensor, None]:
    """One sequence: query [1, Hq, L, d] over its cache's prefix and its tail key/value [1, Hkv, t, d]."""
    layer = cache.layers[module.layer_idx]
    fresh_prefill = layer.prefix is None and key.shape[2] == query.shape[2]
    if cache.recorder is not None:
        cache.recorder.observe(module.layer_idx, query, key, scaling)
    if fresh_prefill:
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling)
    prefix = layer.prefix.materialize() if layer.prefix is not None else None
    if prefix is None or (prefix.uniform and prefix.bias is None):
        prefix_length = 0
        if prefix is not None:
            prefix_length = prefix.keys.shape[1]
            key = torch.cat([prefix.keys[None].to(key.dtype), key], dim=2)
            value = torch.cat([prefix.values[None].to(value.dtype), value], dim=2)
        return _sdpa_over_prefix(module, query, key, value, prefix_length, scaling)
    out = attend_compressed(query[0], key[0], value[0], prefix, scaling)
    return out.transpose(0, 1).unsqueeze(0), None


def _sdpa_over_prefix(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_length: int,
    scaling: float,
) -> tuple[torch.Tensor, None]:
    """Equal-length heads without bias: the same SDPA call a plain transformers cache would make.

    Keys are [prefix; tail] exactly as a dynamic cache would hold them when nothing was dropped, so the
    `full` method reproduces plain generation bit for bit; the caller concatenates them for this call only.
    """
    query_length = query.shape[2]
    mask = None
    if query_length > 1:
        tail_length = key.shape[2] - prefix_length
        visible = ~_tail_mask(query_length, tail_length, query.device)
        seen = torch.ones(query_length, prefix_length, dtype=torch.bool, device=query.device)
        mask = torch.cat([seen, visible], dim=-1)[None, None]
    return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scaling)


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

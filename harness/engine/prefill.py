"""The prefill engine: one full-attention pass over a context, collecting what the methods declared.

The prefill does not depend on the method, so one `Observation` serves every (method, budget) cell:
prefill once, compress many. Observations are read-only for methods; a method builds new tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvbench.harness.cache.attention import LayerAttention, kvbench_attention_enabled
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.families import check_supported, kept_positions

# Query rows per chunk when accumulating attention column sums, so the N×N matrix is never materialised.
_COLUMN_SUM_CHUNK = 256


@dataclass(frozen=True)
class ObservationNeeds:
    """What a method needs from the prefill beyond post-RoPE keys and values (always collected).

    window: the last `window` post-RoPE queries per layer (SnapKV-style scores).
    column_sums: attention received by each key, summed over all queries (H2O-style scores).
    hidden_states: each layer's input hidden states.
    own_prefill: the method changes the prefill itself and cannot share one (at some budgets at least: the
        method's `prefills_itself` says which cells need its own).
    """

    window: int = 0
    column_sums: bool = False
    hidden_states: bool = False
    own_prefill: bool = False

    def union(self, other: ObservationNeeds) -> ObservationNeeds:
        return ObservationNeeds(
            window=max(self.window, other.window),
            column_sums=self.column_sums or other.column_sums,
            hidden_states=self.hidden_states or other.hidden_states,
            own_prefill=False,
        )


@dataclass
class Observation:
    """Everything one context's prefill produced, per layer, batch dimension dropped.

    keys/values: [H_kv, N, d] post-RoPE; window_queries: [H_q, w, d] post-RoPE (the last w positions);
    column_sums: [H_q, N] fp32; hidden_states: [N, hidden] input of each layer; last_logits: [vocab],
    the next-token logits after the context (used when nothing follows the context). seed: for methods that
    draw random numbers, set by the harness from the run seed and the sample (0 outside a sweep).
    """

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scaling: float
    last_logits: torch.Tensor
    window_queries: list[torch.Tensor] | None = None
    column_sums: list[torch.Tensor] | None = None
    hidden_states: list[torch.Tensor] | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)
    seed: int = 0
    # What each layer's attention applied (`LayerAttention`: scaling, window, cap, sinks), as the model asked.
    attention: list[LayerAttention] | None = None
    # Context positions a plain transformers cache holds per layer (sliding windows hold their last W − 1);
    # None: every layer holds the whole context.
    kept_positions: list[int] | None = None
    # Results of deterministic functions of this observation, memoized so that the cells sharing one prefill
    # compute them once (SnapKV's window scores at every budget); see `memoized`.
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def memoized(self, key: tuple, compute) -> torch.Tensor:
        """compute() the first time `key` is asked for, a copy of that result afterwards (callers may write to it)."""
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key].clone()

    @property
    def context_length(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_kv_heads(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[-1])

    def layer_bytes(self, layer: int) -> int:
        """Bytes a plain transformers cache holds for this layer's context (a sliding window's last W − 1)."""
        keys, values = self.keys[layer], self.values[layer]
        kept = self.kept_positions[layer] if self.kept_positions is not None else self.context_length
        return kept * (keys[:, 0].numel() * keys.element_size() + values[:, 0].numel() * values.element_size())

    def kv_bytes_full(self) -> int:
        """Bytes of the uncompressed context cache in the observed dtype, as a plain transformers cache holds it
        (sliding-window layers at their window): the budget's denominator."""
        return sum(self.layer_bytes(layer) for layer in range(self.num_layers))

    def compressed_layers(self) -> list[int]:
        """The layers a method compresses: every layer but the sliding-window ones that keep their window (the
        harness fills those in). Methods that share a budget across layers share it across these."""
        windowed = self.windowed_layers()
        return [layer for layer in range(self.num_layers) if layer not in windowed]

    def windowed_layers(self) -> dict[int, int]:
        """The layers whose sliding window holds fewer positions than the context, with how many it holds."""
        if self.kept_positions is None:
            return {}
        n = self.context_length
        return {layer: kept for layer, kept in enumerate(self.kept_positions) if kept < n}


class Recorder:
    """Collects the declared observations from inside the attention function during the prefill. `attention` is
    the cache's list of what each layer's attention applies, filled in by the attention function before it
    calls `observe`."""

    def __init__(self, needs: ObservationNeeds, num_layers: int, attention: list | None = None):
        self.needs = needs
        self.window_queries: list[torch.Tensor | None] = [None] * num_layers
        self.column_sums: list[torch.Tensor | None] = [None] * num_layers
        self.scaling: float | None = None
        self.attention = attention

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        self.scaling = scaling
        if self.needs.window:
            self.window_queries[layer_idx] = query[0, :, -self.needs.window :, :].clone()
        if self.needs.column_sums:
            layer = self.attention[layer_idx] if self.attention is not None else None
            self.column_sums[layer_idx] = _column_sums(query[0], key[0], layer or LayerAttention(scaling))


def _column_sums(query: torch.Tensor, key: torch.Tensor, attention: LayerAttention) -> torch.Tensor:
    """Σ_i p_ij over the rows i of the model's own attention (causal, windowed, capped, with its sinks), per query
    head, computed in chunks of rows so the N×N matrix is never materialised: [H_q, N] fp32."""
    h_q, n, dim = query.shape
    h_kv = key.shape[0]
    group = h_q // h_kv
    q = query.reshape(h_kv, group, n, dim)
    sums = torch.zeros(h_kv, group, n, dtype=torch.float32, device=query.device)
    cols = torch.arange(n, device=query.device)
    for start in range(0, n, _COLUMN_SUM_CHUNK):
        stop = min(start + _COLUMN_SUM_CHUNK, n)
        logits = attention.cap(
            torch.einsum("hgid,hjd->hgij", q[:, :, start:stop].float(), key.float()) * attention.scaling
        )
        rows = torch.arange(start, stop, device=query.device)
        hidden = cols[None, :] > rows[:, None]
        if attention.window is not None:
            hidden |= cols[None, :] <= rows[:, None] - attention.window
        logits = logits.masked_fill(hidden, float("-inf"))
        sinks = None
        if attention.sinks is not None:
            sinks = attention.sinks.float().reshape(h_kv, group, 1).expand(h_kv, group, stop - start)
        sums += attention.probabilities(logits, sinks).sum(dim=2)
    return sums.reshape(h_q, n)


def _check_every_layer_attended(model: torch.nn.Module, cache: KVBenchCache) -> None:
    """A layer whose attention bypassed transformers' AttentionInterface never reached kvbench's attention: its
    cache would silently be the model's own computation, not kvbench's."""
    missed = [layer for layer, attention in enumerate(cache.attention) if attention is None]
    if missed:
        raise KVBenchError(
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface (layers "
            f"{', '.join(map(str, missed[:5]))}{'...' if len(missed) > 5 else ''}); kvbench cannot serve it exactly"
        )


def context_forward(model: torch.nn.Module, ids: torch.Tensor, cache: KVBenchCache, output_hidden_states=False):
    """One forward of the whole context [1, n] from position 0 into `cache`, through kvbench's attention (which
    hands the cache's recorder what it observes); only the last position's logits are computed."""
    with kvbench_attention_enabled(model):
        return model(
            input_ids=ids,
            position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
            **cache_argument(model, cache),
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=output_hidden_states,
            kvbench_cache=cache,
        )


@torch.inference_mode()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor | list[int], needs: ObservationNeeds) -> Observation:
    """Run the context once with full attention and return its observation."""
    device = model.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    n = ids.shape[1]
    if n == 0:
        raise ValueError("cannot prefill an empty context")
    if needs.window > n:
        needs = ObservationNeeds(n, needs.column_sums, needs.hidden_states, needs.own_prefill)
    check_supported(type(model).__name__, model.config)
    num_layers = model.config.num_hidden_layers
    cache = KVBenchCache(num_layers)
    cache.recorder = Recorder(needs, num_layers, cache.attention)
    out = context_forward(model, ids, cache, output_hidden_states=needs.hidden_states)
    _check_every_layer_attended(model, cache)
    return Observation(
        input_ids=ids[0],
        keys=[layer.keys[0] for layer in cache.layers],
        values=[layer.values[0] for layer in cache.layers],
        scaling=float(cache.recorder.scaling),
        last_logits=out.logits[0, -1],
        window_queries=cache.recorder.window_queries if needs.window else None,
        column_sums=cache.recorder.column_sums if needs.column_sums else None,
        hidden_states=[h[0] for h in out.hidden_states[:num_layers]] if needs.hidden_states else None,
        model=model,
        attention=list(cache.attention),
        kept_positions=kept_positions(model.config, n),
    )


# Called after each chunk of a streaming prefill with (cache, chunk index, the chunk's post-RoPE queries per
# layer, the attention's softmax scale); a method that prunes or merges while prefilling rewrites each layer
# here (e.g. with `absorb_tail`).
ChunkHook = Callable[[KVBenchCache, int, list[torch.Tensor], float], None]


@torch.inference_mode()
def streaming_prefill(
    model: torch.nn.Module, input_ids: torch.Tensor | list[int], chunk_size: int, after_chunk: ChunkHook
) -> tuple[KVBenchCache, torch.Tensor]:
    """Prefill in chunks of `chunk_size` tokens, letting a method compress the cache between chunks.

    For methods that change the prefill itself (online pruning every P tokens): each chunk attends to the
    compressed cache the previous chunks left. Returns the cache and the next-token logits after the context.
    """
    cache, logits = _stream(model, input_ids, chunk_size, after_chunk, every_position=False)
    return cache, logits[-1]


def streaming_forward(
    model: torch.nn.Module, input_ids: torch.Tensor | list[int], chunk_size: int, after_chunk: ChunkHook
) -> tuple[KVBenchCache, torch.Tensor]:
    """`streaming_prefill` with the logits of every position ([n, vocab]) and autograd left to the caller: the
    forward pass of a model trained to work with the compression (each chunk sees what the last one left)."""
    return _stream(model, input_ids, chunk_size, after_chunk, every_position=True)


def _stream(
    model: torch.nn.Module,
    input_ids: torch.Tensor | list[int],
    chunk_size: int,
    after_chunk: ChunkHook,
    every_position: bool,
) -> tuple[KVBenchCache, torch.Tensor]:
    device = model.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    n = ids.shape[1]
    if n == 0:
        raise ValueError("cannot prefill an empty context")
    check_supported(type(model).__name__, model.config)
    num_layers = model.config.num_hidden_layers
    cache = KVBenchCache(num_layers)
    logits = []
    with kvbench_attention_enabled(model):
        for index, start in enumerate(range(0, n, chunk_size)):
            stop = min(start + chunk_size, n)
            cache.recorder = Recorder(ObservationNeeds(window=stop - start), num_layers)
            out = model(
                input_ids=ids[:, start:stop],
                position_ids=torch.arange(cache.get_seq_length(), cache.get_seq_length() + stop - start, device=device)[
                    None
                ],
                **cache_argument(model, cache),
                use_cache=True,
                logits_to_keep=0 if every_position else 1,
                kvbench_cache=cache,
            )
            logits.append(out.logits[0])
            queries, scaling = cache.recorder.window_queries, cache.recorder.scaling
            cache.recorder = None
            after_chunk(cache, index, queries, scaling)
    cache.context_length = n
    return cache, torch.cat(logits) if every_position else logits[-1]

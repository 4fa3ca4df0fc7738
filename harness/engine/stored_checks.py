"""What a stored context must satisfy before it is answered from (`harness/engine/stored_context.py`).

A file can be damaged (a flipped byte, a truncated copy) or edited, and a context that loads wrongly answers
wrongly without a word. So a stored context carries a sha256 per field (one per layer for the layers), recomputed
on load: a changed byte anywhere is refused, naming the field it is in. Independently of the checksums (older
files have none), the rebuilt cache must be what its fields say: every layer covers the recorded context length
(a whole-context or sliding-window prefix exactly, an evicting or merging one with at most that many entries per
KV head), each head's keys, values and biases hold the entries the prefix reports, and the number of layers, KV
heads, channels, window layers, logits and full-cache bytes are the model's. Each refusal is one line naming the
field or layer that differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.pipeline import full_kv_bytes
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.families import kept_positions
from kvbench.harness.models.loading import head_dim

CHECKSUMS = "checksums"
AGAIN = "write it again with 'kvbench generate ... --save-cache FILE'"


def _feed(digest: Any, data: Any) -> None:
    """Every value of the plain data a stored context holds, typed and length-prefixed, so that no two different
    payloads feed the same bytes."""
    if isinstance(data, torch.Tensor):
        flat = data.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(data.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(data, dict):
        digest.update(f"dict {len(data)}\n".encode())
        for key, value in data.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(data, list):
        digest.update(f"list {len(data)}\n".encode())
        for item in data:
            _feed(digest, item)
    elif data is None or isinstance(data, (bool, int, float, str)):
        text = repr(data).encode()
        digest.update(f"{type(data).__name__} {len(text)}\n".encode() + text)
    else:
        raise ValueError(f"a stored context holds no {type(data).__name__}")


def _sha256(data: Any) -> str:
    digest = hashlib.sha256()
    _feed(digest, data)
    return digest.hexdigest()


def field_checksums(payload: dict[str, Any]) -> dict[str, str]:
    """A sha256 of every field of the payload but the checksums, and of each layer apart (`layers[i]`)."""
    sums = {}
    for key, value in payload.items():
        if key == CHECKSUMS:
            continue
        if key == "layers" and isinstance(value, list):
            sums.update({f"layers[{index}]": _sha256(layer) for index, layer in enumerate(value)})
        else:
            sums[key] = _sha256(value)
    return sums


def verify_checksums(payload: dict[str, Any], where: str) -> None:
    """That every field hashes as it did when written; the refusal names the fields that changed (or appeared,
    or went missing)."""
    recorded = payload.get(CHECKSUMS)
    if not isinstance(recorded, dict):
        raise KVBenchError(f"--load-cache {where} is corrupt: it has no checksums; {AGAIN}")
    try:
        now = field_checksums(payload)
    except (ValueError, TypeError, RuntimeError) as error:
        raise KVBenchError(f"--load-cache {where} is corrupt ({error}); {AGAIN}") from None
    changed = [name for name in {**recorded, **now} if recorded.get(name) != now.get(name)]
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise KVBenchError(
            f"--load-cache {where} is corrupt: {shown} differ{'s' if len(changed) == 1 else ''} from the sha256 it "
            f"was written with; {AGAIN}"
        )


def config_difference(stored: dict[str, Any], ours: dict[str, Any]) -> str:
    """The fields two method configurations differ in, with both values: `window (64 vs 32)`; a field one of
    them lacks (an option added since) reads `absent`."""
    names = [
        name for name in {**stored, **ours} if name not in stored or name not in ours or stored[name] != ours[name]
    ]
    return ", ".join(f"{name} ({_value(stored, name)} vs {_value(ours, name)})" for name in names)


def _value(config: dict[str, Any], name: str) -> str:
    return repr(config[name]) if name in config else "absent"


def _refuse(where: str, detail: str) -> KVBenchError:
    return KVBenchError(f"--load-cache {where} is corrupt: {detail}; {AGAIN}")


def check_cache(
    cache: KVBenchCache, last_logits: torch.Tensor, payload: dict[str, Any], loaded: Any, where: str
) -> None:
    """That the rebuilt cache is what the file's fields say, on the model it is loaded for: its layers, each covering
    the recorded context length with the model's KV heads, channels and sliding windows; the logits of its
    vocabulary; the full-cache bytes of that length; the bytes it was stored with."""
    config, n = loaded.model.config, cache.context_length
    if len(cache.layers) != config.num_hidden_layers:
        raise _refuse(where, f"it holds {len(cache.layers)} layers, {loaded.name} has {config.num_hidden_layers}")
    windows = kept_positions(config, n)
    for index, layer in enumerate(cache.layers):
        if layer.prefix_length != n:
            raise _refuse(where, f"recorded context length {n} but layer {index} holds {layer.prefix_length} positions")
        lengths = _entries(layer.prefix, index, config, loaded.name, where)
        _check_coverage(layer.prefix.first_position, lengths, index, n, windows[index], where)
    vocabulary = loaded.model.get_output_embeddings().weight.shape[0]
    if tuple(last_logits.shape) != (vocabulary,):
        raise _refuse(where, f"its last logits have shape {tuple(last_logits.shape)}, not ({vocabulary},)")
    full, recorded = full_kv_bytes(config, n, loaded.dtype), payload.get("kv_bytes_full")
    if recorded is not None and recorded != full:
        raise _refuse(where, f"it records kv_bytes_full {recorded:,} but {n} tokens of {loaded.name} take {full:,}")
    if cache.kv_bytes() != payload["kv_bytes"]:
        raise _refuse(where, f"it holds {cache.kv_bytes():,} bytes, not the {payload['kv_bytes']:,} it was stored with")


def _check_coverage(first: int | None, lengths: list[int], index: int, n: int, window: int, where: str) -> None:
    """A prefix that records its first position (the whole context, a sliding window's last tokens) holds every
    position from it to the end of the context, and a sliding-window layer exactly its window; any other prefix
    keeps at most the context's length per KV head."""
    if window < n and first != n - window:
        raise _refuse(
            where, f"layer {index} holds the last {window} of {n} positions (a sliding window) but starts at {first}"
        )
    if first is not None and (first < 0 or any(first + length != n for length in lengths)):
        last = first + max(lengths) - 1
        raise _refuse(where, f"recorded context length {n} but layer {index} holds positions {first} to {last}")
    if first is None and max(lengths) > n:
        raise _refuse(where, f"recorded context length {n} but layer {index} keeps {max(lengths)} entries in a KV head")


def _entries(prefix: LayerPrefix, index: int, config: Any, model: str, where: str) -> list[int]:
    """The entries each KV head keeps, once its keys, values and biases are checked to hold that many, with the
    model's KV heads and channels."""
    try:
        kv, lengths = prefix.materialize(), prefix.head_lengths()
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError) as error:
        raise _refuse(where, f"layer {index}'s prefix does not rebuild ({error.__class__.__name__}: {error})") from None
    heads, channels = config.num_key_value_heads, head_dim(config)
    if len(lengths) != heads or len(kv.keys) != heads or len(kv.values) != heads:
        raise _refuse(where, f"layer {index} holds {len(kv.keys)} KV heads, {model} has {heads}")
    for head, length in enumerate(lengths):
        keys, values = kv.keys[head], kv.values[head]
        bias = None if kv.bias is None else tuple(kv.bias[head].shape)
        expected = (length, channels)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected or bias not in (None, (length,)):
            raise _refuse(
                where,
                f"layer {index} reports {length} entries of {channels} channels in KV head {head} but holds keys "
                f"{tuple(keys.shape)}, values {tuple(values.shape)}" + ("" if bias is None else f", bias {bias}"),
            )
    return lengths

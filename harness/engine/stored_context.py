"""Stored contexts: a compressed context written to one file and answered later without a prefill.

The file holds what the cache held right after compression (every layer's prefix in its method's own
representation, and the method's decode state), the prefill's last logits, the context length, and the
identity the answer depends on: model fingerprint, dtype, method label, full config, algorithm version and
artifact fingerprint, budget and a format version. It is written with `torch.save` of plain data only (tensors,
dicts, lists, tuples, ints, floats, strings), so `torch.load(weights_only=True)` reads it and loading executes no
code from the file. Format 2 adds a sha256 per field, and every load checks the rebuilt cache against its fields
and the model (`harness/engine/stored_checks.py`); format 1 files (no checksums, no method version) still load,
with every check that needs neither.

Each class a cache may hold is encoded explicitly: `_CLASSES` names the ones whose attributes are plain data
(rebuilt field by field, only from that list), and a latent prefix's decoder, a model-sized artifact shared by
every context, is stored as a reference (layer, K or V, latent size, fingerprint) and re-linked on load from
the method's own loaded checkpoint. Anything else in a cache is refused when saving, in one line.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.latent_prefix import LatentDecoder
from kvbench.harness.engine.stored_checks import (
    AGAIN,
    CHECKSUMS,
    check_cache,
    config_difference,
    field_checksums,
    verify_checksums,
)
from kvbench.harness.errors import KVBenchError
from kvbench.harness.files import save_atomically
from kvbench.harness.provenance import tensors_fingerprint

FORMAT = "kvbench-stored-context"
VERSION = 2
# Format versions this kvbench reads: 1 had no checksums and no method version.
READS = (1, 2)

# Classes rebuilt from their attributes (all plain data, tensors or other listed classes), by the name the file
# gives them. The names are part of the format: they were the classes' module paths when it was defined, and
# stay as they are wherever the classes live now, so contexts stored before still load.
_CLASSES: dict[str, str] = {
    "kvbench.harness.prefix:TokenPrefix": "kvbench.harness.cache.prefix:TokenPrefix",
    "kvbench.harness.prefix:LowRankPrefix": "kvbench.harness.cache.prefix:LowRankPrefix",
    "kvbench.harness.quantized_prefix:QuantizedPrefix": "kvbench.harness.cache.quantized_prefix:QuantizedPrefix",
    "kvbench.harness.quantized_prefix:QuantizedTensor": "kvbench.harness.cache.quantized_prefix:QuantizedTensor",
    "kvbench.harness.latent_prefix:LatentPrefix": "kvbench.harness.cache.latent_prefix:LatentPrefix",
    "kvbench.methods.h2o:H2ODecodeState": "kvbench.methods.h2o:H2ODecodeState",
    "kvbench.methods.tova:TOVADecodeState": "kvbench.methods.tova:TOVADecodeState",
    "kvbench.methods.uncomp:DecodeState": "kvbench.methods.uncomp:DecodeState",
    "kvbench.methods.kivi:KIVIStream": "kvbench.methods.kivi:KIVIStream",
    "kvbench.methods.autoencoder.method:LatentStream": "kvbench.methods.autoencoder.method:LatentStream",
}
_FILE_NAMES = {where: name for name, where in _CLASSES.items()}


def _class_name(obj: object) -> str | None:
    """The name the file gives `obj`'s class, or None if a stored context may not hold it."""
    return _FILE_NAMES.get(f"{type(obj).__module__}:{type(obj).__qualname__}")


def _decoder_ref(decoder: LatentDecoder, layer: int, field: str) -> dict:
    return {
        "kind": "decoder",
        "layer": layer,
        "which": 0 if field.startswith("key") else 1,
        "latent": int(decoder.weight.shape[-2]),
        "fingerprint": tensors_fingerprint({"weight": decoder.weight, "bias": decoder.bias}),
    }


def _encode(obj: Any, layer: int, field: str = "") -> Any:
    """`obj` as plain data; `layer` and `field` say where a decoder reference points."""
    if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes() != obj.numel() * obj.element_size():
        return obj.clone()  # a view (a prefix joined to its tail's room): its own tokens, not the whole storage
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"kind": "dtype", "name": str(obj).removeprefix("torch.")}
    if isinstance(obj, list):
        return [_encode(item, layer, field) for item in obj]
    if isinstance(obj, tuple):
        return {"kind": "tuple", "items": [_encode(item, layer, field) for item in obj]}
    if isinstance(obj, dict):
        return {"kind": "dict", "items": [[_encode(k, layer), _encode(v, layer, field)] for k, v in obj.items()]}
    if isinstance(obj, LatentDecoder):
        return _decoder_ref(obj, layer, field)
    name = _class_name(obj)
    if name is None:
        raise KVBenchError(f"a stored context cannot hold {type(obj).__qualname__} (from {type(obj).__module__}) yet")
    return {"kind": "object", "class": name, "fields": {k: _encode(v, layer, k) for k, v in vars(obj).items()}}


Decoders = Any  # callable (layer, which, latent) -> LatentDecoder


def _decode(data: Any, decoders: Decoders | None) -> Any:
    if data is None or isinstance(data, (bool, int, float, str, torch.Tensor)):
        return data
    if isinstance(data, list):
        return [_decode(item, decoders) for item in data]
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError("unexpected entry")
    kind = data["kind"]
    if kind == "dtype":
        dtype = getattr(torch, data["name"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {data['name']}")
        return dtype
    if kind == "tuple":
        return tuple(_decode(item, decoders) for item in data["items"])
    if kind == "dict":
        return {_decode(k, decoders): _decode(v, decoders) for k, v in data["items"]}
    if kind == "decoder":
        if decoders is None:
            raise KVBenchError("the stored context refers to a latent decoder, but its method has no checkpoint")
        decoder = decoders(data["layer"], data["which"], data["latent"])
        if tensors_fingerprint({"weight": decoder.weight, "bias": decoder.bias}) != data["fingerprint"]:
            raise KVBenchError(
                f"the method's decoder for layer {data['layer']} differs from the one the context was stored with"
            )
        return decoder
    if kind == "object":
        name = data["class"]
        if name not in _CLASSES:
            raise ValueError(f"class {name} is not one a stored context may hold")
        module, _, qualname = _CLASSES[name].partition(":")
        cls = getattr(importlib.import_module(module), qualname)
        obj = cls.__new__(cls)
        obj.__dict__.update({k: _decode(v, decoders) for k, v in data["fields"].items()})
        return obj
    raise ValueError(f"unknown entry kind {kind!r}")


def autoencoder_decoders(method: Any, device: torch.device) -> Decoders | None:
    """Re-link latent decoders from a method's loaded weights (`m{latent}.decoder_weight` [2, L, H_w, m, d])."""
    weights = getattr(method, "weights", None)
    if not weights:
        return None

    def find(layer: int, which: int, latent: int) -> LatentDecoder:
        weight, bias = weights.get(f"m{latent}.decoder_weight"), weights.get(f"m{latent}.decoder_bias")
        if weight is None or bias is None:
            raise KVBenchError(f"the method's checkpoint has no decoder of latent size {latent}")
        return LatentDecoder(weight[which, layer].to(device), bias[which, layer].to(device))

    return find


def identity(loaded: Any, method: Any, budget: float) -> dict[str, Any]:
    """What must match for a stored context to be answered as if it had just been compressed."""
    from kvbench.harness.provenance import loaded_fingerprint

    return {
        "model": loaded.name,
        "model_fingerprint": loaded_fingerprint(loaded),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "method": method.label,
        "method_config": method.config_record(),
        "method_version": method.version,
        "artifact_fingerprint": method.artifact_fingerprint(),
        "budget": float(budget),
    }


def save_context(
    path: str | os.PathLike[str],
    cache: KVBenchCache,
    last_logits: torch.Tensor,
    ident: dict[str, Any],
    kv_bytes_full: int | None = None,
) -> int:
    """Write the compressed context (before any question is fed) atomically; returns the file's bytes."""
    if any(layer.tail_length for layer in cache.layers):
        raise KVBenchError("a stored context is written right after compression, before a question is fed")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        **ident,
        "context_length": int(cache.context_length),
        "kv_bytes": int(cache.kv_bytes()),
        "kv_bytes_full": kv_bytes_full,
        "last_logits": last_logits.detach(),
        "layers": [
            {"prefix_length": int(layer.prefix_length), "prefix": _encode(layer.prefix, index)}
            for index, layer in enumerate(cache.layers)
        ],
        "method_state": _encode(cache.method_state, -1),
    }
    payload[CHECKSUMS] = field_checksums(payload)
    return save_atomically(payload, Path(path))


@dataclass
class StoredContext:
    """A stored context as read: its identity, and the encoded cache (rebuilt by `rebuild`)."""

    path: str
    payload: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.payload[key]


_REQUIRED = ("model_fingerprint", "dtype", "method", "budget", "context_length", "last_logits", "layers", "kv_bytes")


def read_context(path: str | os.PathLike[str], map_location: Any = "cpu") -> StoredContext:
    """Read and check a stored context's format; a missing, corrupt or foreign file is one KVBenchError."""
    where = str(path)
    hint = "write one with 'kvbench generate ... --save-cache FILE'"
    if not Path(where).is_file():
        raise KVBenchError(f"--load-cache {where} is not a file; {hint}")
    try:
        payload = torch.load(where, map_location=map_location, weights_only=True)
    except Exception as error:
        raise KVBenchError(
            f"--load-cache {where} is corrupt or not a stored context ({error.__class__.__name__}); {hint}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KVBenchError(f"--load-cache {where} is not a kvbench stored context; {hint}")
    if payload.get("version") not in READS:
        raise KVBenchError(
            f"--load-cache {where} is stored context format version {payload.get('version')}, this kvbench reads "
            f"versions {', '.join(map(str, READS))}; {hint}"
        )
    if payload["version"] >= 2:
        verify_checksums(payload, where)
    missing = [key for key in _REQUIRED if key not in payload]
    if missing:
        raise KVBenchError(f"--load-cache {where} is corrupt (no {', '.join(missing)}); {hint}")
    return StoredContext(where, payload)


def check_identity(stored: StoredContext, loaded: Any, method: Any) -> None:
    """That the loaded model, dtype, method and its artifact are the ones the context was stored with."""
    from kvbench.harness.provenance import loaded_fingerprint

    where = stored.path
    fingerprint = loaded_fingerprint(loaded)
    if fingerprint != stored["model_fingerprint"]:
        raise KVBenchError(
            f"--load-cache {where} was stored from another model ({stored.payload.get('model')}, "
            f"{stored['model_fingerprint']}), not {loaded.name} ({fingerprint}); pass the model it was stored from"
        )
    dtype = str(loaded.dtype).removeprefix("torch.")
    if dtype != stored["dtype"]:
        raise KVBenchError(
            f"--load-cache {where} was stored in {stored['dtype']}, not {dtype}; pass --dtype {stored['dtype']}"
        )
    refuse_other_method(where, stored, method.label, method.config_record(), f"this kvbench builds {method.label} as")
    version = stored.payload.get("method_version")
    if version is not None and version != method.version:
        raise KVBenchError(
            f"--load-cache {where} was compressed by {stored['method']} version {version}; this kvbench's "
            f"{method.name} is version {method.version}, which keeps other tokens or answers otherwise: compress the "
            "context again"
        )
    if method.artifact_fingerprint() != stored.payload.get("artifact_fingerprint"):
        raise KVBenchError(
            f"--load-cache {where} was compressed with {stored['method']}'s artifact "
            f"{stored.payload.get('artifact_fingerprint')}, not {method.artifact_fingerprint()}; pass the same checkpoint"
        )


def refuse_other_method(where: str, stored: StoredContext, label: str, config: dict[str, Any], asks: str) -> None:
    """One line naming what differs when a method other than the stored context's is asked to answer from it: the
    method, or the fields of its configuration (labels follow from the configuration and the defaults). `asks`
    says who asks: "--method asks for"."""
    recorded = stored.payload.get("method_config")
    if label.partition(":")[0] != stored["method"].partition(":")[0]:
        raise KVBenchError(f"--load-cache {where} was compressed by {stored['method']}, not {label}")
    if not isinstance(recorded, dict):
        raise KVBenchError(f"--load-cache {where} is corrupt: it records no method config; {AGAIN}")
    if config != recorded:
        raise KVBenchError(
            f"--load-cache {where} was compressed with method config {_compact(recorded)}; {asks} "
            f"{_compact(config)}: they differ in {config_difference(recorded, config)}"
        )


def _compact(config: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{name}: {value!r}" for name, value in config.items()) + "}"


def rebuild(
    stored: StoredContext, method: Any, device: torch.device | str = "cpu"
) -> tuple[KVBenchCache, torch.Tensor]:
    """The cache and last logits as they were right after compression (decoders re-linked from `method`)."""
    decoders = autoencoder_decoders(method, torch.device(device))
    try:
        layers = stored["layers"]
        prefixes = [_decode(layer["prefix"], decoders) for layer in layers]
        state = _decode(stored.payload.get("method_state"), decoders)
        cache = KVBenchCache(len(layers), prefixes, int(stored["context_length"]), method_state=state)
        for layer, entry in zip(cache.layers, layers, strict=True):
            layer.prefix_length = int(entry["prefix_length"])
    except KVBenchError:
        raise
    except Exception as error:
        raise KVBenchError(f"--load-cache {stored.path} is corrupt ({error.__class__.__name__}: {error})") from None
    return cache, stored["last_logits"]


@dataclass
class Answer:
    """A question answered against a cache: the generation, its decode time and what the cache held."""

    generation: Any
    kv_bytes: int
    kv_bytes_peak: int
    decode_s: float
    decode_peak_memory_bytes: int | None


def answer(
    loaded: Any,
    method: Any,
    cache: KVBenchCache,
    last_logits: torch.Tensor,
    question_ids: list[int],
    max_new_tokens: int,
    keep_logits: bool = False,
) -> Answer:
    """Greedy answer after a compressed context, as `pipeline.run_cell` decodes it (hooks, peaks, timer)."""
    from kvbench.harness.engine.decode import greedy_decode
    from kvbench.harness.engine.measure import peak_memory_bytes, reset_peak_memory, timed
    from kvbench.harness.engine.pipeline import PeakBytes

    reset_peak_memory(loaded.device)
    kv_bytes = cache.kv_bytes()
    peak = PeakBytes(cache, method.on_decode_step)
    with timed(loaded.device) as watch:
        generation = greedy_decode(
            loaded.model,
            cache,
            list(question_ids),
            max_new_tokens,
            loaded.eos_token_ids,
            tokenizer=loaded.tokenizer,
            first_logits=last_logits,
            step_hook=peak.step,
            keep_logits=keep_logits,
            start_hook=method.on_decode_start,
        )
    return Answer(generation, kv_bytes, peak.read(cache), watch.seconds, peak_memory_bytes(loaded.device))


def load_stored(stored: StoredContext, loaded: Any, method: Any, say=None) -> tuple[KVBenchCache, torch.Tensor, float]:
    """Check a read context against the loaded model and method (calibrated first), rebuild its cache on the
    model's device; returns (cache, last logits, seconds to read and rebuild)."""
    import time

    from kvbench.harness.artifacts.calibration import ensure_calibrated

    if say is None:
        ensure_calibrated(loaded, method)
    else:
        ensure_calibrated(loaded, method, say=say)
    check_identity(stored, loaded, method)
    start = time.perf_counter()
    if torch.device(loaded.device).type != "cpu":  # read again onto the device: storages stay shared
        stored = read_context(stored.path, map_location=loaded.device)
    cache, logits = rebuild(stored, method, loaded.device)
    check_cache(cache, logits, stored.payload, loaded, stored.path)
    return cache, logits, time.perf_counter() - start

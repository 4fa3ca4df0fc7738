"""Disk cache of generated samples: fitting to a tokenizer costs many tokenizations per sample.

A file is named by the hash of everything the samples depend on and stores that key in full,
so a stale or colliding file is regenerated instead of served.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvbench.tasks.fingerprint import sha256_text
from kvbench.tasks.sample import Sample


def _path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    digest = sha256_text(json.dumps(key, sort_keys=True))
    return Path(cache_dir) / f"{key['task']}-{key['target_length']}-{digest[:24]}.json"


def load(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> list[Sample] | None:
    """The cached samples for `key`, or None when absent, unreadable or keyed differently."""
    path = _path(cache_dir, key)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    return [Sample.from_dict(item) for item in stored["samples"]]


def store(cache_dir: str | os.PathLike[str], key: dict[str, Any], samples: list[Sample]) -> Path:
    """Write atomically (temp file + rename) so concurrent runs never read half a file."""
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"key": key, "samples": [s.to_dict() for s in samples]}, ensure_ascii=False)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(payload)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path

"""Files kvbench writes: renamed into place whole (a reader or a kill never sees half of one), into directories
proven writable before any slow work, stamped with UTC times. Shared by the result store, checkpoints,
calibration artifacts and stored contexts.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvbench.harness.errors import KVBenchError


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def file_stamp() -> str:
    """The UTC time as a file name may hold it everywhere (no colons): 20250102T030405Z."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` if needed and prove it writable, or say so in one line."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".kvbench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise KVBenchError(f"cannot write to output directory {directory}: {error.strerror or error}") from None


def save_atomically(payload: Any, path: Path) -> int:
    """torch.save `payload` to `path` through a temporary file in the same directory, synced, then renamed into
    place: a reader (or a kill) never sees half a file. Returns the file's size."""
    import tempfile

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path.stat().st_size

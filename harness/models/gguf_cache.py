"""Converted GGUF weights on disk: dequantize a GGUF file once, load the plain model in every later process.

transformers dequantizes a GGUF file on every load (13-17 s for the embedded model on 2 CPU cores). The
dequantized model, saved as safetensors with its tokenizer, loads in a fraction of that. A conversion lives in
`$KVBENCH_CACHE_DIR/models/<sha256 of the GGUF file>-<dtype>/` (default `~/.cache/kvbench`), so a changed file
is a new entry. It is a cache, not an identity: results keep naming the GGUF file and its hash.

A conversion is written into a temporary directory next to its place and renamed into place whole, with a
marker written last (the source hash, dtype, converter versions and every file's size). A directory without a
matching marker, or with a file of another size, is redone; a process never reads a half-written one.
`KVBENCH_NO_MODEL_CACHE=1` bypasses the cache (every load dequantizes the GGUF file again).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from kvbench.harness.provenance import file_sha256

MARKER = "kvbench-conversion.json"
FORMAT = 1
DISABLE_ENV = "KVBENCH_NO_MODEL_CACHE"
Loaded = TypeVar("Loaded")


def cache_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def models_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench")) / "models"


def _versions() -> dict[str, str | None]:
    """The converters whose output the conversion is: a different version may dequantize differently."""
    found: dict[str, str | None] = {}
    for package in ("transformers", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _expected_marker(source_sha256: str, dtype: str) -> dict:
    return {"format": FORMAT, "source_sha256": source_sha256, "dtype": dtype, "versions": _versions()}


def is_complete(directory: Path, source_sha256: str, dtype: str) -> bool:
    """Whether `directory` holds a finished conversion of this source in this dtype by these converters."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or not marker["files"]:
        return False
    if {k: marker.get(k) for k in ("format", "source_sha256", "dtype", "versions")} != _expected_marker(
        source_sha256, dtype
    ):
        return False
    try:
        return all((directory / name).stat().st_size == size for name, size in marker["files"].items())
    except OSError:
        return False


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _finish(directory: Path, source_sha256: str, dtype: str) -> None:
    """Flush every converted file, then write the marker: a marker on disk means the files before it are."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        _fsync(path)
        files[path.name] = path.stat().st_size
    marker = {**_expected_marker(source_sha256, dtype), "files": files}
    with open(directory / MARKER, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def _lock(path: Path):
    """One converter at a time per entry, so that concurrent processes wait instead of converting twice. The
    atomic rename alone keeps readers safe; the lock only saves the work (it is released if a process dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent processes may both convert; one rename wins
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(directory: Path) -> None:
    """Take a stale entry out of its place in one rename, then delete it: no reader sees it half-deleted."""
    doomed = directory.with_name(f".stale-{directory.name}-{os.getpid()}")
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def converted(source: str | os.PathLike[str], dtype: str, convert: Callable[[Path], None]) -> Path:
    """The directory of `source`'s conversion in `dtype`, made by `convert(empty_directory)` if it is not done."""
    source_sha256 = file_sha256(source)
    root = models_root()
    directory = root / f"{source_sha256}-{dtype}"
    if is_complete(directory, source_sha256, dtype):
        return directory
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{directory.name}.lock"):
        if is_complete(directory, source_sha256, dtype):  # another process finished it while this one waited
            return directory
        for abandoned in root.glob(f".tmp-{directory.name}-*"):  # left by a converter that was killed
            shutil.rmtree(abandoned, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=root))
        try:
            convert(staging)
            _finish(staging, source_sha256, dtype)
            if directory.exists():
                _remove(directory)
            try:
                os.rename(staging, directory)
            except OSError:  # a process without the lock put a complete one there first
                if not is_complete(directory, source_sha256, dtype):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_converted(
    source: str | os.PathLike[str],
    dtype: str,
    convert: Callable[[Path], None],
    load: Callable[[Path], Loaded],
) -> Loaded:
    """`load(directory)` of the conversion; one that will not load (damaged after it was written) is redone once."""
    directory = converted(source, dtype, convert)
    try:
        return load(directory)
    except Exception:  # noqa: BLE001 - any failure to read a cached entry means: rebuild it, then load for real
        with _lock(models_root() / f".{directory.name}.lock"):
            _remove(directory)
        return load(converted(source, dtype, convert))

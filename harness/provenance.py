"""What produced a row: the model's fingerprint, the software, and the identity a finished cell is matched by.

A row carries two things. Its *identity* (model fingerprint, dtype, device, attention backend, task generator
version, chat-template policy, query-aware, seed, and the method's full configuration and artifact
fingerprint) decides whether a rerun may skip the cell: only a row whose whole identity matches counts as
done. Its *provenance* (kvbench version, git commit) says which code computed it; new code resumes a store,
and the rows keep saying which commit wrote each of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

ATTENTION_BACKEND = "kvbench (transformers SDPA for the prefill and unbiased uniform prefixes)"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_CHUNK = 1 << 22


def _cache_file() -> Path:
    root = Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench"))
    return root / "fingerprints.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) so a large weights file is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        known = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    known[key] = value
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(temporary, cache_path)
    except OSError:
        pass  # an unwritable cache costs a re-read next time, nothing else
    return value


def _hub_revision(repo_id: str) -> str | None:
    """The locally cached snapshot commit of a hub model, read offline (None if it is not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def model_fingerprint(location: str, gguf_file: str | None) -> str:
    """`sha256:<hex>` of the weights: the GGUF file, or every weights file of a model directory (names and
    contents, in name order); `hub:<id>@<commit>` for a hub id, by its cached snapshot."""
    if gguf_file is not None:
        return "sha256:" + file_sha256(Path(location) / gguf_file)
    directory = Path(location)
    if directory.is_dir():
        digest = hashlib.sha256()
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        for path in files + [p for p in (directory / "config.json",) if p.is_file()]:
            digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
        return "sha256:" + digest.hexdigest()
    return f"hub:{location}@{_hub_revision(location) or 'unknown-revision'}"


def loaded_fingerprint(loaded: Any) -> str:
    """The fingerprint of a loaded model: of its weights file(s) where it came from files, else of its tensors."""
    source = Path(loaded.source)
    if source.is_file():
        return "sha256:" + file_sha256(source)
    if source.is_dir():
        return model_fingerprint(str(source), None)
    if str(loaded.source).startswith("memory:") or "/" not in str(loaded.source):
        return object_fingerprint(loaded.model)
    return model_fingerprint(str(loaded.source), None)


def object_fingerprint(model: Any) -> str:
    """`params:<hex>` over a model object's parameters and buffers (an in-memory model has no file)."""
    return "params:" + tensors_fingerprint(dict(model.state_dict())).removeprefix("sha256:")


def tensors_fingerprint(tensors: dict[str, Any]) -> str:
    """`sha256:<hex>` of named tensors (a calibration or training artifact), independent of file layout."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(tensor, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()


def kvbench_version() -> str | None:
    from kvbench.harness.requirements import installed_version

    return installed_version("kvbench")


# What produces a row or a benchmark's figure: a change here makes a commit `+dirty`. Result stores committed in the
# same repository (results/) are data: a resumed store rewrites its own tracked run.json before its rows are made.
CODE_PATHS = ("harness", "methods", "tasks", "reports", "benchmarks", "pyproject.toml")


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the kvbench checkout, with `+dirty` when its tracked code differs from it."""
    here = where or Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        # Paths from kvbench's own root (this file's parent's parent), which need not be the repository's top.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
            cwd=here.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def chat_template_policy(tokenizer: Any) -> str:
    """How prompts were built: with the model's own chat template (by its hash), or as raw text."""
    from kvbench.tasks.fingerprint import chat_template_sha256

    template = chat_template_sha256(tokenizer)
    return f"model template sha256:{template[:16]}" if template else "raw text (no chat template)"


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_identity(run_identity: dict[str, Any], method: Any) -> dict[str, Any]:
    """The run's identity plus the method's name, algorithm version, full configuration and artifact fingerprint;
    a method from a plug-in also names its distribution and version (built-ins come with kvbench itself)."""
    from kvbench.methods import REGISTRY, method_origin

    identity = {
        **run_identity,
        "method": method.name,
        "method_version": method.version,
        "method_config": method.config_record(),
        "artifact": method.artifact_fingerprint(),
    }
    if REGISTRY.get(method.name) is type(method) and method_origin(method.name) != "built-in":
        identity["method_origin"] = method_origin(method.name)
    return identity


def provenance() -> dict[str, Any]:
    return {"kvbench_version": kvbench_version(), "git_commit": git_commit()}

"""Time to first token from a stored context, against recomputing the prefill (issue 11 item 5).

For each context size and each (method, budget), the context is compressed once, written as a stored context
(`kvbench generate --save-cache`'s format) and then, --repeats times each (medians reported):

- stored bytes: `kv_bytes` as the harness measures it from the cache's tensors, `stored_tensor_bytes` (every
  tensor storage in the file's payload: the cache, its decode state and the last logits) and `file_bytes` (the
  file's size on disk). Never capped: a size that does not fit (beyond the model's limit, or more host memory or
  disk than is free) is a row that says so, never a smaller size in its place;
- load from disk: the file's pages dropped from the page cache first (`posix_fadvise(DONTNEED)` after the
  writer's fsync), then `torch.load`, the sha256 of every field recomputed and the cache rebuilt (decoders
  re-linked); not the checks of the rebuilt cache against the model (`stored_checks.check_cache`, a pass of
  `materialize` over every layer, as "decompress" below times it), which need a model;
- load from host memory: the same from the file's bytes already in RAM (deserialize, verify and rebuild, no I/O);
- host to device: the payload's tensors copied from pinned host memory to the CUDA device, the timer bracketed
  by `torch.cuda.synchronize()`; where there is no CUDA the column says "no CUDA";
- decompress: every layer's prefix materialized (dequantized, decoded from latents, split per head) once, layer
  by layer, each dropped before the next (attention holds one layer's at a time);
- forward: the question fed against the decompressed context (the first answer token's logits);
- first token (seam): the question fed against the compressed cache as kvbench decodes, decompressing inside
  attention (a cross-check of decompress + forward);
- TTFT = load from disk + host to device (CUDA only) + decompress + forward, against `prefill`: the plain
  model's forward over context and question (what answering costs without a stored context).

Ratios are against the `full` row of the same size in this same run. Synthetic sizes (--synthetic-tokens) build
the stored representations from random tensors of a large config's KV shape (default Llama-3.1-8B: 32 layers, 8
KV heads, head_dim 128, bf16; SnapKV's selection runs on random window queries, the autoencoder on random-weight
encoders and decoders of the right shape): bytes, save, loads, host-to-device and decompression need no model;
forward, first token and prefill do, so they are measured only with a model that fits this machine.
Not a test: timings depend on the machine.

    python benchmarks/ttft.py [--model smollm2-135m] [--lengths 1024,2048,4096] [--budgets 0.25,0.125]
        [--methods full,kivi,autoencoder,snapkv] [--autoencoder-checkpoint PATH] [--repeats 3]
        [--synthetic-tokens 1024,8192] [--synthetic-shape 32,8,128] [--synthetic-dtype bfloat16]
        [--threads N] [--workdir DIR] [--out results/ttft/ttft.json] [--plots]
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from kvbench.harness.cache.attention import kvbench_attention_enabled  # noqa: E402
from kvbench.harness.cache.kv_cache import KVBenchCache  # noqa: E402
from kvbench.harness.cache.prefix import TokenPrefix, stored_bytes  # noqa: E402
from kvbench.harness.engine import stored_context  # noqa: E402
from kvbench.harness.engine.decode import next_token_logits  # noqa: E402
from kvbench.harness.engine.measure import timed  # noqa: E402
from kvbench.harness.engine.pipeline import TimedObservation, compress_context, shared_needs  # noqa: E402
from kvbench.harness.engine.prefill import Observation, prefill  # noqa: E402
from kvbench.harness.engine.stored_checks import verify_checksums  # noqa: E402
from kvbench.harness.errors import BudgetError, KVBenchError  # noqa: E402
from kvbench.methods import get_method  # noqa: E402
from kvbench.methods.base import Method  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "ttft"
NO_CUDA = "no CUDA"
NEEDS_MODEL = "needs the model"
# Host memory a synthetic size needs, in units of its full cache: the random K/V it is compressed from plus one
# method's cache, then a stored file's bytes in RAM plus the tensors loaded from them.
SYNTHETIC_MEMORY_FACTOR = 2.25
GiB = 1 << 30

Cell = tuple[Method, float]


def median_seconds(
    device: torch.device,
    repeats: int,
    work: Callable[[], Any],
    warmup: bool = False,
    setup: Callable[[], Any] | None = None,
) -> tuple[float, list[float], Any]:
    """Median wall time of `work` over `repeats` runs (synchronized on CUDA), every sample, the last result;
    `warmup` runs it once untimed first (model forwards: first-call setup is not what a stored context costs),
    `setup` runs untimed before each repeat."""
    samples, result = [], None
    if warmup:
        work()
    for _ in range(repeats):
        if setup is not None:
            setup()
        with timed(device) as watch:
            result = work()
        samples.append(watch.seconds)
    return statistics.median(samples), samples, result


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages (written and synced) so the next read comes from the disk, not from RAM."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def map_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The stored payload (plain data) with `fn` applied to every tensor."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {k: map_tensors(v, fn) for k, v in data.items()}
    if isinstance(data, list):
        return [map_tensors(v, fn) for v in data]
    return data


def resident_bytes(path: Path) -> int | None:
    """Bytes of the file in the page cache now (util-linux `fincore`; None where it is missing)."""
    import subprocess

    try:
        done = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True
        )
        return int(done.stdout.split()[0]) if done.returncode == 0 else None
    except (OSError, ValueError, IndexError):
        return None


def load_from_disk(path: Path, method: Method) -> tuple[KVBenchCache, torch.Tensor, dict]:
    """Read and rebuild a stored context (the caller drops its pages from the page cache first, untimed)."""
    stored = stored_context.read_context(path)
    cache, logits = stored_context.rebuild(stored, method)
    return cache, logits, stored.payload


def load_from_memory(blob: bytes, method: Method) -> KVBenchCache:
    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    verify_checksums(payload, "<memory>")
    return stored_context.rebuild(stored_context.StoredContext("<memory>", payload), method)[0]


def host_to_device(payload: dict, repeats: int) -> tuple[float | None, list[float]]:
    """Seconds to copy the payload's tensors from pinned host memory to the CUDA device (None without CUDA)."""
    if not torch.cuda.is_available():
        return None, []
    device = torch.device("cuda")
    pinned = map_tensors(payload, lambda t: t.pin_memory())

    def copy() -> dict:
        return map_tensors(pinned, lambda t: t.to(device, non_blocking=True))

    median, samples, _ = median_seconds(device, repeats, copy)
    return median, samples


def decompress_all(cache: KVBenchCache) -> list:
    return [layer.prefix.materialize() for layer in cache.layers]


def decompress_layer_by_layer(cache: KVBenchCache) -> None:
    """Every layer materialized and dropped in turn (attention holds one layer's at a time)."""
    for layer in cache.layers:
        layer.prefix.materialize()


def decompressed_cache(cache: KVBenchCache) -> KVBenchCache:
    """The same context with every prefix replaced by its materialized keys and values."""
    prefixes = [TokenPrefix(kv.keys, kv.values, kv.bias) for kv in decompress_all(cache)]
    return KVBenchCache(len(prefixes), prefixes, cache.context_length, method_state=cache.method_state)


@torch.inference_mode()
def first_token(model: torch.nn.Module, method: Method, cache: KVBenchCache, question_ids: Sequence[int]) -> int:
    """The first answer token after the question, fed against `cache`; the cache is left as it was."""
    method.on_decode_start(cache)
    with kvbench_attention_enabled(model):
        logits = next_token_logits(model, cache, list(question_ids))
    cache.reset_tail()
    return int(torch.argmax(logits))


@torch.inference_mode()
def recompute(model: torch.nn.Module, ids: Sequence[int]) -> int:
    """The plain model over context and question: the first answer token without a stored context."""
    out = model(input_ids=torch.tensor([list(ids)], device=model.device), use_cache=True, logits_to_keep=1)
    return int(torch.argmax(out.logits[0, -1]))


def budget_of(method: Method, budget: float) -> float:
    return budget if method.uses_budget else 1.0


def base_row(part: str, target: int, method: Method, budget: float) -> dict[str, Any]:
    return {
        "part": part,
        "target_tokens": target,
        "method": method.name,
        "label": method.label,
        "budget": budget_of(method, budget),
    }


def save(path: Path, cache: KVBenchCache, logits: torch.Tensor, ident: dict, kv_bytes_full: int) -> tuple:
    """Write the stored context; (kv_bytes measured from the cache's tensors, the file's bytes, seconds)."""
    kv_bytes = cache.kv_bytes()
    with timed(torch.device("cpu")) as watch:
        file_bytes = stored_context.save_context(path, cache, logits, ident, kv_bytes_full)
    if file_bytes != path.stat().st_size:
        raise RuntimeError(f"{path}: save reported {file_bytes} bytes, the file has {path.stat().st_size}")
    return kv_bytes, file_bytes, watch.seconds


def measure_loaded(
    path: Path, saved: tuple[int, int, float], kv_bytes_full: int, method: Method, device: torch.device, repeats: int
) -> tuple[dict[str, Any], KVBenchCache]:
    """The loads, host-to-device copy and decompression of a stored file (no model needed); the cache as
    loaded (on `device`) for the first-token measurements."""
    kv_bytes, file_bytes, save_s = saved
    cpu = torch.device("cpu")
    load_disk_s, disk_samples, (cache, _, payload) = median_seconds(
        cpu, repeats, partial(load_from_disk, path, method), setup=partial(drop_page_cache, path)
    )
    if cache.kv_bytes() != kv_bytes:
        raise RuntimeError(f"{path}: reloaded {cache.kv_bytes()} bytes, not the {kv_bytes} stored")
    drop_page_cache(path)
    cold = resident_bytes(path)
    tensor_bytes = stored_bytes(payload)
    h2d_s, h2d_samples = host_to_device(payload, repeats)
    if device.type != "cpu":
        on_device = map_tensors(payload, lambda t: t.to(device))
        cache = stored_context.rebuild(stored_context.StoredContext(str(path), on_device), method, device)[0]
    del payload
    blob = path.read_bytes()
    load_memory_s, memory_samples, _ = median_seconds(cpu, repeats, partial(load_from_memory, blob, method))
    del blob
    gc.collect()
    decompress_s, decompress_samples, _ = median_seconds(device, repeats, partial(decompress_layer_by_layer, cache))
    measured = {
        "kv_bytes": kv_bytes,
        "kv_bytes_full": kv_bytes_full,
        "stored_tensor_bytes": tensor_bytes,
        "file_bytes": file_bytes,
        "method_bytes": method.method_bytes(),
        "save_s": save_s,
        "page_cache_bytes_after_drop": cold,
        "load_disk_s": load_disk_s,
        "load_memory_s": load_memory_s,
        "h2d_s": h2d_s if h2d_s is not None else NO_CUDA,
        "h2d_bytes": tensor_bytes if h2d_s is not None else None,
        "decompress_s": decompress_s,
        "samples": {
            "load_disk_s": disk_samples,
            "load_memory_s": memory_samples,
            "h2d_s": h2d_samples,
            "decompress_s": decompress_samples,
        },
    }
    return measured, cache


def measure_context(
    loaded: Any,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    cells: Sequence[Cell],
    repeats: int,
    workdir: Path,
    target: int | None = None,
    keep_files: bool = False,
) -> list[dict[str, Any]]:
    """Rows for one context on a real model: every cell's stored bytes and times, and the prefill it saves."""
    target = len(context_ids) if target is None else target
    needed = len(context_ids) + len(question_ids) + 1
    if needed > loaded.max_length:
        status = (
            f"does not fit: {len(context_ids)} context + {len(question_ids)} question tokens + 1 exceeds the "
            f"model's {loaded.max_length}-token limit"
        )
        return [{**base_row("model", target, m, b), "status": status} for m, b in cells]
    device, model = loaded.device, loaded.model
    recompute(model, question_ids)  # warm-up on the question alone: a prefill-length warm-up costs a prefill
    prefill_s, prefill_samples, reference_token = median_seconds(
        device, repeats, partial(recompute, model, [*context_ids, *question_ids])
    )
    observation = prefill(model, list(context_ids), shared_needs([m for m, _ in cells]))
    observed = TimedObservation(observation, prefill_s)
    common = {
        "context_tokens": len(context_ids),
        "question_tokens": len(question_ids),
        "prefill_s": prefill_s,
        "recompute_token": reference_token,
    }
    rows = []
    for index, (method, budget) in enumerate(cells):
        row = {**base_row("model", target, method, budget), **common}
        effective = budget_of(method, budget)
        try:
            compressed = compress_context(loaded, observed, method, effective, context_ids)
        except BudgetError as refusal:
            rows.append({**row, "status": f"refused: {refusal}"})
            continue
        ident = stored_context.identity(loaded, method, effective)
        path = workdir / f"ttft-{len(context_ids)}-{index}.pt"
        saved = save(path, compressed.cache, compressed.last_logits, ident, compressed.kv_bytes_full)
        full_bytes = compressed.kv_bytes_full
        del compressed
        gc.collect()
        measured, cache = measure_loaded(path, saved, full_bytes, method, device, repeats)
        raw = decompressed_cache(cache)
        forward_s, forward_samples, token = median_seconds(
            device, repeats, partial(first_token, model, method, raw, question_ids), warmup=True
        )
        del raw
        seam_s, seam_samples, seam_token = median_seconds(
            device, repeats, partial(first_token, model, method, cache, question_ids), warmup=True
        )
        h2d = measured["h2d_s"] if isinstance(measured["h2d_s"], float) else 0.0
        ttft = measured["load_disk_s"] + h2d + measured["decompress_s"] + forward_s
        measured["samples"].update(
            forward_s=forward_samples, first_token_seam_s=seam_samples, prefill_s=prefill_samples
        )
        row.update(
            measured,
            status="ok",
            forward_s=forward_s,
            first_token_seam_s=seam_s,
            ttft_s=ttft,
            first_token=token,
            seam_token=seam_token,
        )
        row["file"] = str(path) if keep_files else None
        if not keep_files:
            path.unlink()
        rows.append(row)
        gc.collect()
    return add_ratios(rows)


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured row against the `full` row of the same part and size in these rows (None without one)."""
    full = {(r["part"], r["target_tokens"]): r for r in rows if r["method"] == "full" and r.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        reference = full.get((row["part"], row["target_tokens"]))
        ratio = {}
        for name in ("kv_bytes", "file_bytes", "load_disk_s", "load_memory_s", "decompress_s", "ttft_s"):
            mine, theirs = row.get(name), reference.get(name) if reference else None
            ratio[f"{name}_vs_full"] = mine / theirs if isinstance(mine, float | int) and theirs else None
        row.update(ratio)
        row["kv_ratio"] = row["kv_bytes"] / row["kv_bytes_full"]
        if isinstance(row.get("ttft_s"), float):
            row["speedup_vs_prefill"] = row["prefill_s"] / row["ttft_s"]
    return rows


# ---------------------------------------------------------------- synthetic sizes (no model)


def synthetic_observation(
    layers: int, heads: int, dim: int, n: int, dtype: torch.dtype, window: int, query_heads: int, vocab: int, seed: int
) -> Observation:
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return Observation(
        input_ids=torch.zeros(1, n, dtype=torch.long),
        keys=[random(heads, n, dim) for _ in range(layers)],
        values=[random(heads, n, dim) for _ in range(layers)],
        scaling=dim**-0.5,
        last_logits=random(vocab),
        window_queries=[random(query_heads, min(window, n), dim) for _ in range(layers)] if window else None,
    )


def random_autoencoder_weights(layers: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Random encoders and decoders of the trained shape (m = d/8, d/4, d/2; one per layer for K and V)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for latent in sorted({max(1, dim // 8), max(1, dim // 4), max(1, dim // 2)}):
        shape = (2, layers, 1)
        weights[f"m{latent}.encoder_weight"] = torch.randn(*shape, dim, latent, generator=generator) / dim**0.5
        weights[f"m{latent}.encoder_bias"] = torch.zeros(*shape, 1, latent)
        weights[f"m{latent}.decoder_weight"] = torch.randn(*shape, latent, dim, generator=generator) / latent**0.5
        weights[f"m{latent}.decoder_bias"] = torch.zeros(*shape, 1, dim)
    return weights


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KVBenchError("cannot read MemAvailable from /proc/meminfo")


def measure_synthetic(
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    n: int,
    cells: Sequence[Cell],
    repeats: int,
    workdir: Path,
    query_heads: int,
    vocab: int,
    available_bytes: int | None = None,
    shape_name: str = "",
) -> list[dict[str, Any]]:
    """Rows for one synthetic size: stored bytes, save, loads, host-to-device and decompression of each cell."""
    layers, heads, dim = shape
    element = torch.empty((), dtype=dtype).element_size()
    full_bytes = 2 * layers * heads * n * dim * element
    memory = available_memory_bytes() if available_bytes is None else available_bytes
    need_memory = int(SYNTHETIC_MEMORY_FACTOR * full_bytes)
    need_disk = full_bytes  # the largest file (full) exists alone: each file is removed after its row
    free_disk = shutil.disk_usage(workdir).free
    common = {"context_tokens": n, "kv_shape": shape_name, "dtype": str(dtype).removeprefix("torch.")}
    status = None
    if need_memory > memory:
        status = (
            f"does not fit: needs about {need_memory / GiB:.1f} GiB of host memory, {memory / GiB:.1f} GiB available"
        )
    elif need_disk > free_disk:
        status = (
            f"does not fit: needs {need_disk / GiB:.1f} GiB of disk under {workdir}, {free_disk / GiB:.1f} GiB free"
        )
    if status is not None:
        return [
            {**base_row("synthetic", n, m, b), **common, "kv_bytes_full": full_bytes, "status": status}
            for m, b in cells
        ]
    window = max((m.needs().window for m, _ in cells), default=0)
    observation = synthetic_observation(layers, heads, dim, n, dtype, window, query_heads, vocab, seed=n)
    stored = []
    for index, (method, budget) in enumerate(cells):
        row = {**base_row("synthetic", n, method, budget), **common}
        effective = budget_of(method, budget)
        try:
            prefixes = method.compress(observation, effective)
        except BudgetError as refusal:
            stored.append(({**row, "status": f"refused: {refusal}"}, None, None))
            continue
        cache = KVBenchCache(layers, prefixes, n)
        path = workdir / f"ttft-synthetic-{n}-{index}.pt"
        ident = {
            "model": f"synthetic ({shape_name}, random tensors)",
            "model_fingerprint": "synthetic",
            "dtype": common["dtype"],
            "method": method.label,
            "method_config": method.config_record(),
            "artifact_fingerprint": method.artifact_fingerprint(),
            "budget": effective,
        }
        stored.append((row, path, save(path, cache, observation.last_logits, ident, full_bytes)))
        del cache, prefixes
        gc.collect()
    del observation
    gc.collect()
    rows = []
    for row, path, saved in stored:
        if path is None:
            rows.append(row)
            continue
        method = next(m for m, b in cells if m.label == row["label"] and budget_of(m, b) == row["budget"])
        measured, _ = measure_loaded(path, saved, full_bytes, method, torch.device("cpu"), repeats)
        path.unlink()
        rows.append(
            {
                **row,
                **measured,
                "status": "ok",
                "forward_s": NEEDS_MODEL,
                "first_token_seam_s": NEEDS_MODEL,
                "ttft_s": NEEDS_MODEL,
                "prefill_s": NEEDS_MODEL,
            }
        )
        gc.collect()
    return add_ratios(rows)


# ---------------------------------------------------------------- command line


def model_cells(names: Sequence[str], budgets: Sequence[float], checkpoint: str | None) -> list[Cell]:
    """`full` first (every ratio's reference), then each other method at each budget."""
    cells: list[Cell] = [(get_method("full"), 1.0)]
    for name in names:
        if name == "full":
            continue
        spec = f"{name}:checkpoint={checkpoint}" if name.split(":")[0] == "autoencoder" and checkpoint else name
        cells += [(get_method(spec), budget) for budget in budgets]
    return cells


def synthetic_cells(names: Sequence[str], budgets: Sequence[float], layers: int, dim: int) -> list[Cell]:
    """The same methods for the synthetic shape; the autoencoder with random-weight encoders and decoders."""
    cells: list[Cell] = [(get_method("full"), 1.0)]
    for name in names:
        if name == "full":
            continue
        for budget in budgets:
            method = get_method(name)
            if method.name == "autoencoder":
                method.load_calibration(random_autoencoder_weights(layers, dim, seed=0))
            cells.append((method, budget))
    return cells


def passkey_context(loaded: Any, length: int) -> tuple[list[int], list[int]]:
    from kvbench.tasks import generate_samples, split_prompt

    sample = generate_samples("passkey", loaded.tokenizer, length, 1)[0]
    parts = split_prompt(loaded.tokenizer, sample.context, sample.question, sample.answer_prefix)
    return list(parts.context_ids), list(parts.question_ids)


COLUMNS = [
    ("part", "part"),
    ("context_tokens", "tokens"),
    ("label", "method"),
    ("budget", "b"),
    ("kv_bytes", "kv_bytes"),
    ("file_bytes", "file bytes"),
    ("file_bytes_vs_full", "file/full"),
    ("load_disk_s", "load disk s"),
    ("load_memory_s", "load RAM s"),
    ("h2d_s", "H2D s"),
    ("decompress_s", "decompress s"),
    ("forward_s", "forward s"),
    ("first_token_seam_s", "1st token (seam) s"),
    ("ttft_s", "TTFT s"),
    ("prefill_s", "prefill s"),
    ("speedup_vs_prefill", "prefill/TTFT"),
    ("ttft_s_vs_full", "TTFT/full"),
]


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row.get("status") != "ok":
            head = [
                cell_text(row.get(k, row.get("target_tokens") if k == "context_tokens" else None))
                for k, _ in COLUMNS[:4]
            ]
            lines.append("| " + " | ".join(head) + f" | {row.get('status')} |" + " |" * (len(COLUMNS) - 5))
            continue
        lines.append("| " + " | ".join(cell_text(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], run: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run, "rows": rows}, indent=1, default=str) + "\n")
    fields = sorted({key for row in rows for key in row if key != "samples"})
    with out.with_suffix(".csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != "samples"})


def numbers(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVBenchError(f"{what} must be comma-separated {kind.__name__}s, not {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise KVBenchError(f"{what} must be positive, not {text!r}")
    return values


def filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fs, *_ = line.split()
            if str(path.resolve()).startswith(point) and len(point) > len(best):
                best, kind = point, fs
    return kind


def run(args: argparse.Namespace) -> int:
    from kvbench.harness.artifacts.calibration import ensure_calibrated
    from kvbench.harness.models.loading import load_model
    from kvbench.harness.provenance import provenance

    lengths = numbers(args.lengths, int, "--lengths") if args.lengths else []
    synthetic = numbers(args.synthetic_tokens, int, "--synthetic-tokens") if args.synthetic_tokens else []
    budgets = numbers(args.budgets, float, "--budgets")
    if any(b > 1 for b in budgets):
        raise KVBenchError(f"--budgets must lie in (0, 1], not {args.budgets}")
    shape = tuple(numbers(args.synthetic_shape, int, "--synthetic-shape"))
    if len(shape) != 3:
        raise KVBenchError("--synthetic-shape is layers,kv_heads,head_dim (e.g. 32,8,128)")
    synthetic_dtype = getattr(torch, args.synthetic_dtype, None)
    if not isinstance(synthetic_dtype, torch.dtype):
        raise KVBenchError(f"--synthetic-dtype {args.synthetic_dtype} is not a torch dtype")
    names = [n for n in args.methods.split(",") if n]
    if args.repeats < 1:
        raise KVBenchError("--repeats must be at least 1")
    if args.autoencoder_checkpoint and not Path(args.autoencoder_checkpoint).is_file():
        raise KVBenchError(f"--autoencoder-checkpoint {args.autoencoder_checkpoint} is not a file")
    if args.threads < 0:
        raise KVBenchError("--threads must be 0 (torch's default) or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="kvbench-ttft-", dir=args.workdir))
    run_record: dict[str, Any] = {
        "repeats": args.repeats,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else NO_CUDA,
        "workdir_filesystem": filesystem(workdir),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **provenance(),
        "notes": [
            "load_disk_s: the file's pages dropped from the page cache (fsync, posix_fadvise DONTNEED, untimed) before "
            "each read; page_cache_bytes_after_drop is what fincore then reports resident",
            "forward_s and first_token_seam_s: one untimed warm-up run before the timed repeats; prefill_s: the "
            "model warmed up on the question alone first",
            "TTFT = load_disk_s + h2d_s (CUDA only) + decompress_s + forward_s; prefill_s is the plain model over "
            "context and question",
        ],
    }
    rows: list[dict[str, Any]] = []
    try:
        if lengths:
            loaded = load_model(args.model, args.device, args.dtype)
            cells = model_cells(names, budgets, args.autoencoder_checkpoint)
            for method, _ in cells:
                ensure_calibrated(loaded, method)
            run_record.update(
                model=args.model,
                dtype=str(loaded.dtype).removeprefix("torch."),
                device=str(loaded.device),
                model_limit=loaded.max_length,
            )
            for length in lengths:
                if length > loaded.max_length:
                    status = f"does not fit: {length} tokens exceed {args.model}'s {loaded.max_length}-token limit"
                    rows += [{**base_row("model", length, m, b), "status": status} for m, b in cells]
                    continue
                context_ids, question_ids = passkey_context(loaded, length)
                rows += measure_context(loaded, context_ids, question_ids, cells, args.repeats, workdir, length)
                print(f"ttft: {args.model} at {length} tokens done", file=sys.stderr)
            del loaded
        if synthetic:
            layers, heads, dim = shape
            cells = synthetic_cells(names, budgets, layers, dim)
            name = f"{layers} layers, {heads} KV heads, head_dim {dim}, {args.synthetic_dtype}"
            run_record["synthetic"] = {
                "kv_shape": name,
                "query_heads": args.synthetic_query_heads,
                "vocab": args.synthetic_vocab,
                "autoencoder": "random-weight decoders",
                "snapkv": "selection on random window queries",
            }
            for n in synthetic:
                rows += measure_synthetic(
                    shape,
                    synthetic_dtype,
                    n,
                    cells,
                    args.repeats,
                    workdir,
                    args.synthetic_query_heads,
                    args.synthetic_vocab,
                    shape_name=name,
                )
                print(f"ttft: synthetic {n} tokens done", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    write_outputs(rows, run_record, out)
    print(
        f"device {run_record.get('device', 'cpu')} | {run_record['cuda']} | torch {torch.__version__} | "
        f"{run_record['cpu_threads']} threads | repeats {args.repeats} (medians) | "
        f"files on {run_record['workdir_filesystem']}"
    )
    print(markdown(rows))
    print(f"\nwritten: {out} and {out.with_suffix('.csv')}")
    if args.plots:
        from ttft_plots import plot

        for path in plot(out, out.parent / "plots"):
            print(f"plot: {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", default="1024,2048,4096", help="context sizes on the model ('' for none)")
    parser.add_argument("--budgets", default="0.25,0.125")
    parser.add_argument("--methods", default="full,kivi,autoencoder,snapkv")
    parser.add_argument("--autoencoder-checkpoint", default=None, help="a 'kvbench train autoencoder' checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--synthetic-tokens", default="1024,8192", help="synthetic context sizes ('' for none)")
    parser.add_argument("--synthetic-shape", default="32,8,128", help="layers,kv_heads,head_dim (Llama-3.1-8B)")
    parser.add_argument("--synthetic-dtype", default="bfloat16")
    parser.add_argument("--synthetic-query-heads", type=int, default=32, help="for SnapKV's window queries")
    parser.add_argument("--synthetic-vocab", type=int, default=128256, help="size of the stored last logits")
    parser.add_argument("--workdir", default=None, help="where the stored files are written (default: /tmp)")
    parser.add_argument("--out", default=str(RESULTS / "ttft.json"))
    parser.add_argument("--plots", action="store_true", help="also write the three plots under OUT's plots/")
    args = parser.parse_args()
    try:
        return run(args)
    except KVBenchError as error:
        print(f"ttft: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

"""benchmarks/ttft.py's measuring functions on a tiny in-process model: the bytes it reports are the stored file's
and tensors', its ratios are against the full row of the same run, a size that does not fit is reported and never
shrunk, and the plots script draws its three files from the output. (Its timings are not checked: they depend
on the machine.)"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model, tiny_tokenizer

from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ttft  # noqa: E402
import ttft_plots  # noqa: E402

LAYERS, KV_HEADS, DIM = 2, 2, 16  # tiny_model("llama-gqa"): 4 query heads of 16 channels, 2 KV heads
CONTEXT, QUESTION = 160, 6
KIVI = "kivi:group_size=16:residual=16"


@pytest.fixture(scope="module")
def loaded():
    model = tiny_model("llama-gqa", layers=LAYERS)
    return LoadedModel("tiny", "memory:tiny-ttft", model, tiny_tokenizer(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def cells():
    return [(get_method("full"), 1.0), (get_method(KIVI), 0.3), (get_method("snapkv"), 0.4)]


@pytest.fixture(scope="module")
def rows(loaded, cells, tmp_path_factory):
    context, question = random_ids(CONTEXT, seed=1), random_ids(QUESTION, seed=2)
    workdir = tmp_path_factory.mktemp("ttft")
    return ttft.measure_context(loaded, context, question, cells, repeats=2, workdir=workdir, keep_files=True)


def storages(obj, seen: dict[int, int]) -> dict[int, int]:
    """Every tensor storage reachable through dicts and lists, by data pointer (a direct walk, for reference)."""
    if isinstance(obj, torch.Tensor):
        seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for value in obj.values():
            storages(value, seen)
    elif isinstance(obj, list):
        for value in obj:
            storages(value, seen)
    return seen


def by_method(rows):
    return {row["method"]: row for row in rows}


def test_stored_bytes_are_the_files_and_the_tensors_measured(rows):
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"]
    for row in rows:
        path = Path(row["file"])
        assert row["file_bytes"] == path.stat().st_size
        payload = torch.load(path, weights_only=True)
        assert row["stored_tensor_bytes"] == sum(storages(payload, {}).values())
        cache_part = storages([payload["layers"], payload["method_state"]], {})
        assert row["kv_bytes"] == sum(cache_part.values())
        assert row["file_bytes"] > row["stored_tensor_bytes"] > row["kv_bytes"]
        if shutil.which("fincore"):  # the disk loads were cold: the file's pages were dropped before each
            assert row["page_cache_bytes_after_drop"] == 0
    full = by_method(rows)["full"]
    assert full["kv_bytes"] == 2 * LAYERS * KV_HEADS * CONTEXT * DIM * 4 == full["kv_bytes_full"]
    # snapkv at 0.4 keeps round(0.4 · 160) = 64 tokens per head, stored as fp32 keys and values.
    assert by_method(rows)["snapkv"]["kv_bytes"] == 2 * LAYERS * KV_HEADS * 64 * DIM * 4
    assert by_method(rows)["kivi"]["kv_bytes"] <= 0.3 * full["kv_bytes"]


def test_ratios_and_totals_come_from_the_full_row_of_the_same_run(rows):
    full = by_method(rows)["full"]
    for row in rows:
        assert row["kv_bytes_vs_full"] == row["kv_bytes"] / full["kv_bytes"]
        assert row["file_bytes_vs_full"] == row["file_bytes"] / full["file_bytes"]
        assert row["ttft_s_vs_full"] == row["ttft_s"] / full["ttft_s"]
        assert row["load_disk_s_vs_full"] == row["load_disk_s"] / full["load_disk_s"]
        assert row["prefill_s"] == full["prefill_s"]  # one recompute per size, shared by every row
        assert row["speedup_vs_prefill"] == row["prefill_s"] / row["ttft_s"]
        assert row["h2d_s"] == ("no CUDA" if not torch.cuda.is_available() else row["h2d_s"])
        assert row["ttft_s"] == pytest.approx(row["load_disk_s"] + row["decompress_s"] + row["forward_s"], rel=1e-12)
        for name, samples in row["samples"].items():
            if samples:
                assert len(samples) == 2 and row[name] == statistics.median(samples)


def test_the_stored_context_answers_as_the_recompute_does(rows):
    full = by_method(rows)["full"]
    assert full["first_token"] == full["recompute_token"] == full["seam_token"]
    for row in rows:  # decompress-then-forward and the cache seam attend to the same keys and values
        assert row["first_token"] == row["seam_token"]


def test_a_context_beyond_the_model_limit_is_reported_not_shrunk(loaded, cells, tmp_path):
    too_long = random_ids(loaded.max_length + 1)
    rows = ttft.measure_context(loaded, too_long, [5, 6], cells, repeats=1, workdir=tmp_path, target=len(too_long))
    assert len(rows) == len(cells)
    for row in rows:
        assert row["status"].startswith("does not fit") and str(loaded.max_length) in row["status"]
        assert row["target_tokens"] == loaded.max_length + 1 and "kv_bytes" not in row and "context_tokens" not in row
    assert list(tmp_path.iterdir()) == []


def synthetic_cells():
    autoencoder = get_method("autoencoder")
    autoencoder.load_calibration(ttft.random_autoencoder_weights(LAYERS, DIM, seed=0))
    return [(get_method("full"), 1.0), (get_method(KIVI), 0.5), (autoencoder, 0.3)]


def test_a_synthetic_size_that_does_not_fit_in_memory_is_reported_not_shrunk(tmp_path):
    n = 4096
    full = 2 * LAYERS * KV_HEADS * n * DIM * 2  # bf16
    rows = ttft.measure_synthetic(
        (LAYERS, KV_HEADS, DIM), torch.bfloat16, n, synthetic_cells(), 1, tmp_path, 4, 32, available_bytes=full
    )
    assert [row["status"].split(":")[0] for row in rows] == ["does not fit"] * 3
    assert all(row["kv_bytes_full"] == full and row["context_tokens"] == n and "kv_bytes" not in row for row in rows)
    assert list(tmp_path.iterdir()) == []


def test_a_synthetic_size_measures_bytes_and_loads_without_a_model(tmp_path):
    n = 64
    rows = ttft.measure_synthetic((LAYERS, KV_HEADS, DIM), torch.bfloat16, n, synthetic_cells(), 2, tmp_path, 4, 32)
    assert [row["status"] for row in rows] == ["ok"] * 3
    full, kivi, autoencoder = rows
    assert full["kv_bytes"] == 2 * LAYERS * KV_HEADS * n * DIM * 2
    # m = d/4 = 4 latents in bf16 for K and V: a quarter of the full bytes, the decoders in method_bytes.
    assert autoencoder["kv_bytes"] == full["kv_bytes"] // 4
    assert autoencoder["method_bytes"] == sum(
        t.numel() * 4 for name, t in ttft.random_autoencoder_weights(LAYERS, DIM, 0).items() if "decoder" in name
    )
    assert kivi["kv_bytes_vs_full"] == kivi["kv_bytes"] / full["kv_bytes"] <= 0.5
    for row in rows:
        assert row["ttft_s"] == row["forward_s"] == row["prefill_s"] == "needs the model"
        assert row["file_bytes"] > row["kv_bytes"] and row["load_disk_s"] > 0 and row["load_memory_s"] > 0
    assert list(tmp_path.iterdir()) == []  # every file removed after its row


def test_the_plots_script_draws_three_files_from_the_output(rows, tmp_path):
    out = tmp_path / "ttft.json"
    ttft.write_outputs(rows, {"repeats": 2}, out)
    assert json.loads(out.read_text())["rows"][0]["method"] == "full" and out.with_suffix(".csv").is_file()
    paths = ttft_plots.plot(out, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["compression_ratio.png", "speedup.png", "time_comparison.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    speedup = ttft_plots.series(json.loads(out.read_text())["rows"], "speedup_vs_prefill", "model")
    assert speedup[("model", "kivi:group_size=16:residual=16 @ 0.3")] == [
        (CONTEXT, by_method(rows)["kivi"]["prefill_s"] / by_method(rows)["kivi"]["ttft_s"])
    ]


def test_a_bad_argument_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ttft.py", "--budgets", "0.5,1.5"])
    assert ttft.main() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--budgets" in err

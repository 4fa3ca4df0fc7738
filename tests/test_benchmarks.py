"""The benchmark scripts run end to end on a tiny model (their numbers are not checked: they depend on the machine)."""

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    assert finished.value.code == 0


def test_core_benchmark_times_a_method_through_its_own_prefill(tiny_model_dir, monkeypatch, capsys):
    # attention_clustering prunes while prefilling at 0.25 (B < N): compress() on the shared prefill would raise.
    argv = ["--model", tiny_model_dir, "--lengths", "256", "--repeats", "1", "--new-tokens", "4", "--budget", "0.25"]
    # Two decode methods, one of them (h2o with decode_evict) not in --methods: the shared prefill collects its needs.
    argv += ["--methods", "full,snapkv,attention_clustering"]
    argv += ["--decode-method", "attention_clustering,h2o:decode_evict=true"]
    run_script("core.py", argv, monkeypatch)
    out = capsys.readouterr().out
    assert "attention_clustering" in out and "its own prefill" in out
    assert "ratio attention_clustering/full decode time" in out
    assert "ratio h2o:decode_evict=true/full decode time" in out


def test_streaming_benchmark_shows_the_bounded_cache(tiny_model_dir, monkeypatch, capsys):
    argv = ["--model", tiny_model_dir, "--context", "256", "--new-tokens", "161", "--window", "40"]
    argv += ["--pruning-interval", "32", "--budget", "0.1"]
    run_script("streaming.py", argv, monkeypatch)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4
    full_entries, ours_entries = [int(row[-2]) for row in rows], [int(row[-1]) for row in rows]
    assert full_entries == sorted(full_entries) and full_entries[-1] > full_entries[0]
    # b = 0.1 of a context of about 230 tokens: K ≈ 22, B ≈ 88 (≤ 96). Unpruned, 160 answer tokens would take it
    # past 180 entries; pruned every P = 32 tokens once over B, it stays under B + P.
    assert max(ours_entries) <= 96 + 32 and ours_entries[-1] < full_entries[-1] - 100

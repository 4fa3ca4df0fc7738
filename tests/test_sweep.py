"""`kvbench run`: rows, metadata, reports, resumption after a kill, and user errors, on a tiny local model."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from browser import CHROMIUM, decoded_image_widths

from kvbench.harness.cli.commands import main

TIMING_FIELDS = {"prefill_s", "compress_s", "decode_s", "peak_memory_bytes", "decode_tokens_per_s"}
ROW_FIELDS = {
    "task", "length", "sample_id", "method", "budget", "score", "kv_bytes", "kv_bytes_full", "prefill_s",
    "compress_s", "decode_s", "new_tokens", "output", "references",
}  # fmt: skip


@pytest.fixture(autouse=True)
def sample_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))


def sweep_args(chat_model_dir, out, *extra, samples="2"):
    return [
        "run", "--model", chat_model_dir, "--methods", "full,snapkv,streaming_llm", "--budgets", "0.25,0.5",
        "--tasks", "niah_single_1,vt", "--lengths", "1024", "--samples", samples, "--out", str(out), "--no-progress",
        *extra,
    ]  # fmt: skip


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def key(row):
    return (row["task"], row["length"], row["sample_id"], row["method"], row["budget"])


EXPECTED_CELLS = 2 * 2 * (1 + 2 + 2)  # tasks × samples × (full once + 2 methods × 2 budgets)


@pytest.fixture(scope="module")
def finished_run(chat_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    os.environ["KVBENCH_CACHE_DIR"] = str(out.parent / "cache")
    try:
        assert main(sweep_args(chat_model_dir, out)) == 0
    finally:
        del os.environ["KVBENCH_CACHE_DIR"]
    return out


def test_sweep_writes_one_row_per_cell(finished_run):
    rows = read_rows(finished_run)
    assert len(rows) == EXPECTED_CELLS == len({key(r) for r in rows})
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert 0 <= row["score"] <= 100
        assert row["kv_bytes"] / row["kv_bytes_full"] <= row["budget"] + 0.02
        assert row["length"] == 1024 and row["context_tokens"] + row["question_tokens"] <= 1024
    assert {r["budget"] for r in rows if r["method"] == "full"} == {1.0}


def test_one_prefill_serves_every_cell_of_a_sample(finished_run):
    rows = read_rows(finished_run)
    by_sample = {}
    for row in rows:
        by_sample.setdefault((row["task"], row["sample_id"]), set()).add(row["prefill_s"])
    assert all(len(times) == 1 for times in by_sample.values())


def test_run_metadata(finished_run):
    meta = json.loads((finished_run / "run.json").read_text())
    for field in ("model", "dtype", "device", "attention_backend", "versions", "git_commit", "command", "seed"):
        assert field in meta
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
    assert meta["command"].startswith("kvbench run --model") and meta["finished_at"]
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["seed"] == 42


def test_reports_are_written_with_plots(finished_run, tmp_path):
    markdown = (finished_run / "report.md").read_text()
    assert "snapkv" in markdown and "streaming_llm" in markdown
    page = finished_run / "report.html"
    html = page.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "http://" not in html and "https://" not in html
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    widths = decoded_image_widths(page, tmp_path)
    assert len(widths) == html.count("<img ") >= 3 and all(w > 100 for w in widths)


def test_same_seed_gives_identical_rows(chat_model_dir, finished_run, tmp_path):
    again = tmp_path / "again"
    assert main(sweep_args(chat_model_dir, again)) == 0
    strip = [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_rows(finished_run)]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_rows(again)]


def test_rerun_skips_finished_cells(chat_model_dir, finished_run, capsys):
    before = (finished_run / "results.jsonl").read_bytes()
    assert main(sweep_args(chat_model_dir, finished_run, "--no-report")) == 0
    assert (finished_run / "results.jsonl").read_bytes() == before


def test_interrupted_run_loses_nothing_and_resumes(chat_model_dir, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "KVBENCH_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "kvbench.harness.cli.commands", *sweep_args(chat_model_dir, out, "--no-report")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    finished = results.read_text().splitlines()
    assert 4 <= len(finished) < EXPECTED_CELLS
    with open(results, "a") as handle:  # a row cut short by the kill
        handle.write('{"task": "vt", "length": 1024, "sam')

    assert main(sweep_args(chat_model_dir, out, "--no-report")) == 0
    lines = results.read_text().splitlines()
    assert lines[: len(finished)] == finished  # nothing finished was lost or rewritten
    rows = [json.loads(line) for line in lines]
    assert len(rows) == EXPECTED_CELLS == len({key(r) for r in rows})  # nothing computed twice


def test_a_packed_store_reports_and_resumes(chat_model_dir, tmp_path):
    """results.jsonl.gz alone (how results/ keeps large stores in git): the report reads it; a resume unpacks it,
    keeps every row and computes only the missing cells."""
    import gzip

    out = tmp_path / "packed"
    assert main(sweep_args(chat_model_dir, out, "--no-report", samples="1")) == 0
    plain = out / "results.jsonl"
    finished = plain.read_text().splitlines()
    (out / "results.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    assert main(["report", str(out)]) == 0  # without the packed rows: "no results.jsonl", exit 1
    assert main(sweep_args(chat_model_dir, out, "--no-report")) == 0
    assert not (out / "results.jsonl.gz").exists()
    lines = plain.read_text().splitlines()
    assert lines[: len(finished)] == finished
    assert len(lines) == EXPECTED_CELLS == len({key(json.loads(line)) for line in lines})


@pytest.mark.parametrize(
    "change, message",
    [
        (["--tasks", "niah_single_1,nope"], "unknown task 'nope'"),
        (["--methods", "full,nope"], "unknown method 'nope'"),
        (["--budgets", "0.25,1.5"], r"budget 1.5 is outside \(0, 1\]"),
        (["--lengths", "4096"], "exceeds .* maximum of 2048"),
        (["--lengths", "abc"], "not a whole number"),
        (["--samples", "0"], "at least 1"),
    ],
)
def test_sweep_input_errors(chat_model_dir, tmp_path, capsys, change, message):
    args = sweep_args(chat_model_dir, tmp_path / "out")
    for flag, value in zip(change[::2], change[1::2]):
        args[args.index(flag) + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvbench: error: ")
    assert re.search(message, err[0])


def test_repeated_arguments_run_once_and_say_so(chat_model_dir, tmp_path, capsys):
    """Repeats, spelt alike or not (0.5 and 0.50; snapkv and snapkv:window=64, its default), are one cell each,
    and each merge is said once on stderr."""
    out = tmp_path / "repeats"
    args = ["run", "--model", chat_model_dir, "--methods", "full,snapkv,full,snapkv:window=64", "--budgets",
            "0.5,0.50,0.5", "--tasks", "niah_single_1,niah_single_1", "--lengths", "512,512", "--samples", "1",
            "--out", str(out), "--no-progress", "--no-report"]  # fmt: skip
    assert main(args) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvbench: note:")]
    assert notes == [
        "kvbench: note: --budgets lists 0.5 3 times (as 0.5, 0.50); it runs once",
        "kvbench: note: --tasks lists niah_single_1 twice; it runs once",
        "kvbench: note: --lengths lists 512 twice; it runs once",
        "kvbench: note: --methods lists full twice; it runs once",
        "kvbench: note: --methods lists snapkv twice (as snapkv, snapkv:window=64); it runs once",
    ]
    assert sorted(key(row) for row in read_rows(out)) == [
        ("niah_single_1", 512, 0, "full", 1.0),
        ("niah_single_1", 512, 0, "snapkv", 0.5),
    ]


def test_unwritable_output_dir(chat_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(sweep_args(chat_model_dir, blocker / "out")) == 2
    assert "cannot write to output directory" in capsys.readouterr().err


def test_results_of_another_seed_are_refused_unless_forced(chat_model_dir, finished_run, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("run.json", "results.jsonl"):
        (out / name).write_bytes((finished_run / name).read_bytes())
    assert main([*sweep_args(chat_model_dir, out, "--no-report", samples="1"), "--seed", "7"]) == 2
    assert "another run: seed 42 (now 7)" in capsys.readouterr().err
    assert main([*sweep_args(chat_model_dir, out, "--no-report", samples="1"), "--seed", "7", "--force"]) == 0
    rows = read_rows(out)
    assert len(rows) == EXPECTED_CELLS // 2 and {r["seed"] for r in rows} == {7}

"""The result store under misuse: damaged lines are refused, or moved aside with --force; a last line cut short by a
kill is said and recomputed; one run at a time writes a store; a run that fails before its first row leaves no
directory behind. On a tiny local model; each run takes seconds."""

import json
import subprocess
import sys

import pytest

from kvbench.harness.cli.commands import main
from kvbench.harness.runner import sweep
from kvbench.harness.runner.store import LOCK

SAMPLES = 2


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))


def run_args(model_dir, out, *extra, lengths="512"):
    return ["run", "--model", model_dir, "--methods", "snapkv", "--budgets", "0.5", "--tasks", "niah_single_1",
            "--lengths", lengths, "--samples", str(SAMPLES), "--out", str(out), "--no-progress", "--no-report",
            *extra]  # fmt: skip


@pytest.fixture
def finished(chat_model_dir, tmp_path, capsys):
    """A finished run of SAMPLES rows, and the bytes of its store."""
    out = tmp_path / "run"
    assert main(run_args(chat_model_dir, out)) == 0
    capsys.readouterr()
    return out, (out / "results.jsonl").read_bytes()


def refuse_model_loads(patch):
    """What must be refused is refused before the model loads: loading it fails the test."""
    patch.setattr(sweep, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))


def cells(out):
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return sorted((row["task"], row["sample_id"], row["method"], row["budget"]) for row in rows)


def test_a_damaged_store_is_refused_and_force_moves_the_damage_aside(chat_model_dir, finished, capsys, monkeypatch):
    out, whole = finished
    first = whole.splitlines(keepends=True)[0]
    # Neither JSON nor UTF-8; JSON but no object; an object without a row's fields. The second sample's row is gone.
    garbage = b"{not a row \xff\n[1, 2]\n" + b'{"note": "written by hand"}\n'
    (out / "results.jsonl").write_bytes(first + garbage)
    damaged = (out / "results.jsonl").read_bytes()
    with monkeypatch.context() as patch:
        refuse_model_loads(patch)
        assert main(run_args(chat_model_dir, out)) == 2
    assert capsys.readouterr().err == (
        f"kvbench: error: {out}/results.jsonl has 3 unreadable lines (lines 2, 3, 4); repair or remove them, "
        "or pass --force to move them aside and go on\n"
    )
    assert (out / "results.jsonl").read_bytes() == damaged  # refused before anything was written

    assert main(run_args(chat_model_dir, out, "--force")) == 0
    (aside,) = out.glob("results.damaged-*.jsonl")
    assert aside.read_bytes() == garbage  # moved, byte for byte, never deleted
    err = capsys.readouterr().err
    assert f"kvbench: note: {out}/results.jsonl has 3 unreadable lines (lines 2, 3, 4); moved them to {aside}\n" in err
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert lines[0] == first and len(lines) == SAMPLES  # the readable row kept as it was; the missing one computed
    assert cells(out) == [("niah_single_1", i, "snapkv", 0.5) for i in range(SAMPLES)]


def test_a_cut_last_line_is_said_dropped_and_computed_again(chat_model_dir, finished, capsys):
    out, whole = finished
    first, second = whole.splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(first + second[:40])  # the second row as a kill leaves it
    assert main(run_args(chat_model_dir, out)) == 0
    err = capsys.readouterr().err
    assert (
        f"kvbench: note: the last line of {out}/results.jsonl (line 2) was incomplete, as a killed run leaves it; "
        "dropped, its cell will be computed again\n"
    ) in err
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert lines[0] == first and cells(out) == [("niah_single_1", i, "snapkv", 0.5) for i in range(SAMPLES)]


def test_a_whole_last_row_without_its_newline_is_kept(chat_model_dir, finished, capsys):
    out, whole = finished
    (out / "results.jsonl").write_bytes(whole.rstrip(b"\n"))
    assert main(run_args(chat_model_dir, out)) == 0
    assert "incomplete" not in capsys.readouterr().err
    assert (out / "results.jsonl").read_bytes() == whole  # nothing dropped, nothing computed again


def test_a_second_writer_is_refused_while_another_process_holds_the_store(chat_model_dir, tmp_path, capsys):
    out = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kvbench.harness.runner.store import ResultStore\n"
         f"with ResultStore({str(out)!r}).writing():\n    print('held', flush=True)\n    time.sleep(300)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.MonkeyPatch.context() as patch:
            refuse_model_loads(patch)
            assert main(run_args(chat_model_dir, out)) == 2
        assert capsys.readouterr().err == (
            f"kvbench: error: {out} is in use by another kvbench run (pid {holder.pid}); "
            "wait for it or use another --out\n"
        )
        assert not (out / "run.json").exists()
    finally:
        holder.kill()  # as a crash: the kernel drops the lock with the process
        holder.wait(timeout=30)
    assert main(run_args(chat_model_dir, out)) == 0
    assert len(cells(out)) == SAMPLES and not (out / LOCK).exists()


def test_a_run_that_fails_before_its_first_row_leaves_no_directory(chat_model_dir, tmp_path, capsys):
    """niah_single_1 cannot fit 64 tokens: the sweep fails after writing run.json, before any row."""
    out = tmp_path / "new" / "run"
    assert main(run_args(chat_model_dir, out, lengths="64")) == 2
    assert "length 64 is too small" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main([*run_args(chat_model_dir, out), "--methods", "snapkv:window=x"]) == 2  # refused while validating
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"  # a directory the user made is left, emptied of what the failed run wrote
    mine.mkdir()
    assert main(run_args(chat_model_dir, mine, lengths="64")) == 2
    assert mine.is_dir() and not list(mine.iterdir())


def test_a_failed_run_into_a_store_with_rows_takes_nothing_back(chat_model_dir, finished):
    out, whole = finished
    assert main(run_args(chat_model_dir, out, lengths="512,64")) == 2
    assert (out / "results.jsonl").read_bytes() == whole and (out / "run.json").exists()
    assert not (out / LOCK).exists()

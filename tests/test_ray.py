"""`kvbench run --workers N` on a local Ray cluster of 2 CPUs and a tiny saved model: the same rows as one
process, a worker killed mid-unit retried with every row stored once, a unit that always kills its worker
recorded as failed (and computed by the next run), an interrupted driver resumed, and no Ray said in one line.

Faults are injected in the actors only, by a Ray worker setup hook (`_install_faults`, below) that wraps the
runner's unit function: a marker file `once-TASK-ID` makes the first actor that runs that unit exit after
computing it and before handing it back; `always-TASK-ID` makes every actor that runs it exit."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from kvbench.harness.cli.commands import main  # noqa: E402

TESTS = Path(__file__).resolve().parent
FAULTS_ENV = "KVBENCH_TEST_RAY_FAULTS"
MEASURED = ("_s", "peak_memory_bytes")  # timings and process memory: the only fields allowed to differ
SAMPLES = 2
UNITS = 2 * SAMPLES  # two tasks
CELLS_PER_UNIT = 3  # full once, snapkv at two budgets


def _install_faults() -> None:
    """Ray worker setup hook: wrap the unit function of the runner with the marker-file faults above."""
    from kvbench.harness.runner import ray_runner

    real = ray_runner._run_unit

    def faulty(loaded, length, sample, todo, context):
        faults = Path(os.environ[FAULTS_ENV])
        first = sample[0] if isinstance(sample, list) else sample  # a list: one context's questions
        name = f"{first.task}-{first.sample_id}"
        cells = real(loaded, length, sample, todo, context)
        once = faults / f"once-{name}"
        try:
            once.rename(faults / f"taken-{name}")  # atomic: only the first actor to get here exits
            os._exit(3)
        except FileNotFoundError:
            pass
        if (faults / f"always-{name}").exists():
            os._exit(3)
        return cells

    ray_runner._run_unit = faulty


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-faults")


@pytest.fixture(scope="module")
def cluster(faults):
    """One local Ray cluster of 2 CPUs for the module; the in-process runs use this session."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={
            "env_vars": {"PYTHONPATH": path, FAULTS_ENV: str(faults), "TQDM_DISABLE": "1"},
            "worker_process_setup_hook": "test_ray._install_faults",
        },
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(autouse=True)
def sample_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ray-sample-cache"))


def sweep_args(model_dir, out, *extra, samples=SAMPLES):
    return [
        "run", "--model", model_dir, "--methods", "full,snapkv", "--budgets", "0.25,0.5", "--tasks",
        "niah_single_1,vt", "--lengths", "1024", "--samples", str(samples), "--out", str(out), "--no-progress",
        "--no-report", *extra,
    ]  # fmt: skip


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def key(row):
    return (row["task"], row["length"], row["sample_id"], row["method"], row["budget"], row["metric"])


def comparable(rows):
    """Rows by cell, without the measured timings and memory: what must match whatever ran them."""
    stripped = [{k: v for k, v in row.items() if not k.endswith(MEASURED)} for row in rows]
    return sorted(stripped, key=lambda row: key(row))


def assert_each_cell_once(rows, units=UNITS):
    assert len(rows) == units * CELLS_PER_UNIT == len({key(row) for row in rows})


@pytest.fixture(scope="module")
def one_process(chat_model_dir, tmp_path_factory):
    """The reference: the same sweep in this process, without Ray (`--workers 1`)."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    os.environ["KVBENCH_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "ray-sample-cache")
    try:
        assert main(sweep_args(chat_model_dir, out, "--workers", "1")) == 0
    finally:
        del os.environ["KVBENCH_CACHE_DIR"]
    rows = read_rows(out)
    assert_each_cell_once(rows)
    return rows


def test_two_workers_give_the_rows_of_one_process(cluster, chat_model_dir, one_process, tmp_path, capsys):
    out = tmp_path / "two"
    args = [arg for arg in sweep_args(chat_model_dir, out, "--workers", "2") if arg != "--no-progress"]
    assert main(args) == 0
    error = capsys.readouterr().err
    assert "kvbench: 2 Ray workers on cpu, 1 torch threads each" in error
    assert f"{UNITS * CELLS_PER_UNIT}/{UNITS * CELLS_PER_UNIT} " in error  # one bar over every worker's cells
    rows = read_rows(out)
    assert_each_cell_once(rows)
    assert comparable(rows) == comparable(one_process)
    assert not any("error" in row for row in rows)
    meta = json.loads((out / "run.json").read_text())
    assert meta["finished_at"] and meta["invocations"][-1]["command"].endswith("--workers 2")


def test_dying_workers_lose_no_row_and_write_none_twice(cluster, faults, chat_model_dir, one_process, tmp_path, capsys):
    """vt #1 kills its first actor once, after computing and before handing back: it is retried. niah #0 kills
    every actor that runs it: after three tries its cells are recorded as failed, and the next run computes them."""
    (faults / "once-vt-1").touch()
    always = faults / "always-niah_single_1-0"
    always.touch()
    out = tmp_path / "dying-workers"
    try:
        assert main(sweep_args(chat_model_dir, out, "--workers", "2")) == 0
    finally:
        always.unlink()
    assert (faults / "taken-vt-1").exists(), "no worker was killed on vt #1: the test proved nothing"
    (faults / "taken-vt-1").unlink()
    error = capsys.readouterr().err
    assert error.count("a Ray worker died running vt@1024 #1; retrying it") == 1
    assert error.count("a Ray worker died running niah_single_1@1024 #0; retrying it") == 2
    rows = read_rows(out)
    assert_each_cell_once(rows)
    failed = [row for row in rows if row.get("worker_failed")]
    assert {(row["task"], row["sample_id"]) for row in failed} == {("niah_single_1", 0)}
    assert len(failed) == CELLS_PER_UNIT
    reference = {key(row): row for row in comparable(one_process)}
    for row in comparable(rows):
        if not row.get("worker_failed"):
            assert row == reference[key(row)]
            continue
        assert row["score"] is None and "output" not in row
        assert row["error"].startswith("unit failed: its Ray worker died 3 times (ActorDiedError: ")
        # Like a refused budget's row: the cell's identity and prompt sizes, no measurement.
        shared = set(row) - {"score", "error", "worker_failed"}
        assert {"identity_hash", "method_config", "context_tokens", "question_tokens", "references"} <= shared
        assert {k: row[k] for k in shared} == {k: reference[key(row)][k] for k in shared}

    assert main(sweep_args(chat_model_dir, out, "--workers", "2")) == 0  # the rerun computes the failed unit
    rows = read_rows(out)
    assert_each_cell_once(rows)
    assert comparable(rows) == comparable(one_process)


def test_an_interrupted_driver_resumes(cluster, chat_model_dir, tmp_path, monkeypatch):
    samples = 6
    out = tmp_path / "killed-driver"
    env = {**os.environ, "KVBENCH_CACHE_DIR": str(tmp_path / "cache")}
    args = sweep_args(chat_model_dir, out, "--ray-address", cluster, "--workers", "2", samples=samples)
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbench.harness.cli.commands", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    results = out / "results.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= CELLS_PER_UNIT:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run finished before it could be interrupted: {stderr[-500:]}"
    finished = results.read_text().splitlines()
    assert CELLS_PER_UNIT <= len(finished) < 2 * samples * CELLS_PER_UNIT

    monkeypatch.setenv("KVBENCH_CACHE_DIR", env["KVBENCH_CACHE_DIR"])
    assert main(sweep_args(chat_model_dir, out, "--workers", "2", samples=samples)) == 0
    lines = results.read_text().splitlines()
    assert lines[: len(finished)] == finished  # nothing finished was lost or rewritten
    assert_each_cell_once([json.loads(line) for line in lines], units=2 * samples)  # nothing computed twice


def test_without_ray_the_flags_say_how_to_install_it(chat_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    out = tmp_path / "no-ray"
    for flags in (["--workers", "2"], ["--ray-address", "127.0.0.1:6379"]):
        assert main(sweep_args(chat_model_dir, out, *flags)) == 2
        error = capsys.readouterr().err
        assert error == (
            'kvbench: error: --workers and --ray-address run on Ray, which is not installed: pip install "kvbench[ray]"\n'
        )
    assert not (out / "run.json").exists() and not (out / "results.jsonl").exists()  # said before any slow work


def test_workers_below_one_is_one_line(chat_model_dir, tmp_path, capsys):
    assert main(sweep_args(chat_model_dir, tmp_path / "out", "--workers", "0")) == 2
    assert capsys.readouterr().err == "kvbench: error: --workers 0 must be at least 1\n"


@pytest.mark.parametrize("seconds", ["0", "-1", "inf", "soon"])
def test_a_ray_timeout_that_is_no_time_is_one_line(chat_model_dir, tmp_path, capsys, seconds):
    assert main(sweep_args(chat_model_dir, tmp_path / "out", "--ray-address", "auto", "--ray-timeout", seconds)) == 2
    assert capsys.readouterr().err == (
        f"kvbench: error: argument --ray-timeout: {seconds!r} is not a number of seconds above 0 "
        "(see 'kvbench run --help')\n"
    )


def test_an_unreachable_cluster_fails_within_seconds_in_one_line(chat_model_dir, tmp_path):
    """Nothing listens at 127.0.0.1:1. Ray's own connect retries such an address for about a quarter of an hour,
    printing its warnings meanwhile; kvbench says it in one line before the model loads, and leaves no --out."""
    out = tmp_path / "unreachable"
    args = sweep_args(chat_model_dir, out, "--workers", "2", "--ray-address", "127.0.0.1:1")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kvbench.harness.cli.commands", *args], capture_output=True, text=True, timeout=300
    )
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.fullmatch(
        r"kvbench: error: cannot reach the Ray cluster at 127\.0\.0\.1:1( \(\S+:1\))?: connection refused; "
        r"is `ray start --head` running there\?\n",
        done.stderr,
    ), done.stderr[-2000:]
    assert seconds < 30
    assert not out.exists()


@pytest.mark.parametrize(
    "reply, reason",
    [
        (None, "no answer within 1 s (--ray-timeout raises it)"),  # accepts, then stays silent
        (b"SSH-2.0-OpenSSH_9.6\r\n", "something answers there, but not a Ray cluster (no gRPC server)"),
    ],
)
def test_a_port_where_no_ray_cluster_answers_is_one_line(chat_model_dir, tmp_path, capsys, reply, reason):
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []

    def answer():
        connection, _ = server.accept()
        accepted.append(connection)
        connection.sendall(reply)

    if reply is not None:
        threading.Thread(target=answer, daemon=True).start()
    started = time.monotonic()
    try:
        args = sweep_args(chat_model_dir, tmp_path / "out", "--ray-address", f"127.0.0.1:{port}", "--ray-timeout", "1")
        assert main(args) == 2
    finally:
        for sock in (*accepted, server):
            sock.close()
    assert time.monotonic() - started < 10
    error = capsys.readouterr().err
    assert error.startswith(f"kvbench: error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert f": {reason}; " in error and error.count("\n") == 1


@pytest.mark.parametrize(
    "address, endpoint",
    [
        ("ray://head:10002", ("head", 10002)),
        ("ray://head", ("head", 10001)),  # Ray Client's default port
        ("ray://[::1]:10001", ("::1", 10001)),
        ("10.0.0.1:6379", ("10.0.0.1", 6379)),
        ("auto", ("10.0.0.2", 6380)),  # from RAY_ADDRESS, as Ray resolves it
    ],
)
def test_every_form_of_ray_address_names_what_is_probed(monkeypatch, address, endpoint):
    from kvbench.harness.runner.ray_runner import _endpoint

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6380")
    assert _endpoint(address) == endpoint


@pytest.mark.parametrize("address", ["head", "head:port", "ray://head:port"])
def test_an_address_ray_cannot_take_is_one_line(address):
    from kvbench.harness.errors import KVBenchError
    from kvbench.harness.runner.ray_runner import check_cluster

    with pytest.raises(
        KVBenchError, match=rf"^--ray-address {re.escape(address)} is not a Ray address; give HOST:PORT"
    ):
        check_cluster(address, 1.0)


class FakeCluster:
    """What `_placement` reads of Ray: the alive nodes and their resources."""

    def __init__(self, *nodes):
        self._nodes = [{"Alive": True, "Resources": dict(node)} for node in nodes]
        self._nodes.append({"Alive": False, "Resources": {"CPU": 64, "GPU": 8}})  # a dead node counts for nothing

    def nodes(self):
        return self._nodes


@pytest.mark.parametrize(
    "nodes, workers, device, units, expected",
    [
        ([{"CPU": 2}], 2, "cpu", 10, (2, {"num_cpus": 1}, 1)),  # this machine: one thread each
        ([{"CPU": 16}], 2, "cpu", 10, (2, {"num_cpus": 8}, 8)),
        ([{"CPU": 16}], 8, "cpu", 3, (3, {"num_cpus": 5}, 5)),  # no more actors than units, their threads shared
        ([{"CPU": 4}, {"CPU": 2}], 2, "cpu", 10, (2, {"num_cpus": 2}, 2)),  # 3 each fit no second node
        ([{"CPU": 8}, {"CPU": 8}], None, "cpu", 10, (2, {"num_cpus": 8}, 8)),  # unset: one per node
        ([{"CPU": 16, "GPU": 4}], None, "cuda", 10, (4, {"num_gpus": 1, "num_cpus": 1}, 4)),  # unset: one per GPU
        ([{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}], 3, "cuda", 10, (3, {"num_gpus": 1, "num_cpus": 1}, 5)),
    ],
)
def test_placement_splits_the_cluster(nodes, workers, device, units, expected):
    from kvbench.harness.runner.ray_runner import _placement

    assert _placement(FakeCluster(*nodes), workers, device, units) == expected


@pytest.mark.parametrize(
    "nodes, workers, device, message",
    [
        ([{"CPU": 2}], 4, "cpu", "--workers 4 needs 4 CPUs but the Ray cluster has 2"),
        ([{"CPU": 16, "GPU": 1}], 2, "cuda", "--workers 2 needs 2 GPUs but the Ray cluster has 1"),
    ],
)
def test_placement_refuses_what_the_cluster_cannot_hold(nodes, workers, device, message):
    from kvbench.harness.errors import KVBenchError
    from kvbench.harness.runner.ray_runner import _placement

    with pytest.raises(KVBenchError, match=message):
        _placement(FakeCluster(*nodes), workers, device, 10)


def test_contexts_with_several_questions_give_the_rows_of_one_process_on_two_workers(
    cluster, chat_model_dir, tmp_path, capsys
):
    """A data set whose rows share contexts (kvpress rows: one context with three questions, one with two): each
    context is one unit on a worker, compressed once per cell there, and the rows equal one process's."""
    passage = "The Eiffel Tower was designed by the engineer Gustave Eiffel and stands in Paris. "
    rows = [
        {"context": passage * 20, "question": q, "answer_prefix": "Answer:", "answer": ["Eiffel"], "max_new_tokens": 5}
        for q in ("Who designed the tower?", "Where is the tower?", "When was it built?")
    ] + [
        {"context": passage * 25 + "Nothing else.", "question": q, "answer_prefix": "Answer:", "answer": ["Paris"],
         "max_new_tokens": 5}
        for q in ("Which city?", "Which engineer?")
    ]  # fmt: skip
    data = tmp_path / "kvpress"
    data.mkdir()
    (data / "shared.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = {}
    for workers in ("1", "2"):
        out = tmp_path / f"workers{workers}"
        args = [
            "run", "--model", chat_model_dir, "--methods", "full,snapkv", "--budgets", "0.5", "--tasks",
            "kvpress:shared", "--samples", "5", "--data", f"kvpress={data}", "--out", str(out), "--no-progress",
            "--no-report", "--workers", workers,
        ]  # fmt: skip
        assert main(args) == 0
        results[workers] = read_rows(out)
    capsys.readouterr()
    assert len(results["2"]) == 2 * 5 and not any("error" in row for row in results["2"])
    assert sorted(row["context_id"] for row in results["2"] if row["method"] == "full") == [0, 0, 0, 1, 1]

    def by_cell(rows):
        stripped = [{k: v for k, v in row.items() if not k.endswith(MEASURED)} for row in rows]
        return sorted(stripped, key=lambda row: (row["sample_id"], row["method"]))

    assert by_cell(results["2"]) == by_cell(results["1"])

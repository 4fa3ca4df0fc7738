"""`kvbench run --workers N` / `--ray-address ADDR`: a sweep's work units on Ray actors, the driver the only writer.

A work unit is one sample's prefill and all its cells (`sweep.unit_cells`). Each actor loads the model once, on
a GPU of its own when the run's device is CUDA, else with its share of the CPU threads. The driver hands units
to idle actors and appends a unit's rows to the store the moment it comes back, so an interrupted run resumes as
a sequential one does. A unit whose actor dies is given to a fresh actor, at most `MAX_ATTEMPTS` times in all;
then its cells are recorded as failed with the reason (`sweep.failed_unit_rows`), and a rerun tries them again.
Scheduling, placement and fault detection are Ray's; this module only keeps the queue and the store.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from kvbench.harness.errors import KVBenchError

INSTALL = 'pip install "kvbench[ray]"'
MAX_ATTEMPTS = 3  # tries per unit (the first and two retries) before its cells are recorded as failed
READY_TIMEOUT_S = 600.0  # how long the first actors may take to be placed and load the model
CONNECT_TIMEOUT_S = 10.0  # how long a cluster's address may take to answer (--ray-timeout)
RAY_CLIENT_PORT = 10001  # the port of a ray://HOST address that names none (Ray Client's default)
# What an HTTP/2 client sends first (RFC 9113 §3.4): the preface, then a SETTINGS frame, here empty (a 9-byte
# header: length 0, type 4, no flags, stream 0). A server answers with a SETTINGS frame of its own.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)
HTTP2_SETTINGS = 0x04


def require_ray() -> None:
    """Before any slow work: --workers and --ray-address need Ray, said in one line."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise KVBenchError(f"--workers and --ray-address run on Ray, which is not installed: {INSTALL}") from None


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise KVBenchError(f"--workers {workers} must be at least 1")


def check_cluster(address: str | None, timeout: float) -> None:
    """That the cluster's address answers as a Ray cluster does, each step within `timeout` seconds. Ray's own
    connect retries an address where nothing listens (or nothing answers) for about a quarter of an hour, printing
    its core's warnings about the address it resolved meanwhile; checked here, it is one line within seconds. Asked
    before the model loads, and again just before joining (the cluster may go while a large model loads)."""
    endpoint = _endpoint(address) if address and address != "local" else None
    if endpoint is None:
        return
    reason = _no_cluster(endpoint, timeout)
    if reason is None:
        return
    resolved = f"{endpoint[0]}:{endpoint[1]}"
    where = address if resolved == address else f"{address} ({resolved})"
    raise KVBenchError(f"cannot reach the Ray cluster at {where}: {reason}; is `ray start --head` running there?")


def _no_cluster(endpoint: tuple[str, int], timeout: float) -> str | None:
    """Why no Ray cluster answers at `endpoint`, or None when one may. Ray's GCS and its client server are gRPC
    servers, so they answer an HTTP/2 preface with a SETTINGS frame: another service on the port (the dashboard,
    SSH) or one that accepts and stays silent is told apart at once. A TLS cluster (RAY_USE_TLS) is only connected
    to: it speaks HTTP/2 inside TLS alone. A proxy that answers HTTP/2 for every address passes: Ray's connect
    then gives up on its own."""
    try:
        with socket.create_connection(endpoint, timeout=timeout) as connection:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None
            connection.sendall(HTTP2_PREFACE)
            reply = connection.recv(9)
    except TimeoutError:
        return f"no answer within {timeout:g} s (--ray-timeout raises it)"
    except OSError as error:  # refused, unreachable network, unknown host, reset
        return (error.strerror or str(error)).lower()
    if len(reply) < 4 or reply[3] != HTTP2_SETTINGS:
        return "something answers there, but not a Ray cluster (no gRPC server)"
    return None


def _endpoint(address: str) -> tuple[str, int] | None:
    """The host and port Ray would connect to: `ray://HOST[:PORT]` (Ray Client) as given; `HOST:PORT` and `auto`
    (RAY_ADDRESS, else the cluster `ray start` started last on this machine) as Ray itself resolves them, a local
    host becoming this node's address. None where Ray would start a cluster rather than join one."""
    if address.startswith("ray://"):
        given = address.removeprefix("ray://")
        host, colon, port = given.rpartition(":")
        return _host_port(address, host, port) if colon else _host_port(address, given, str(RAY_CLIENT_PORT))
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError as error:  # `auto` with no cluster recorded or running
        raise KVBenchError(f"no Ray cluster for --ray-address {address}: {str(error).splitlines()[0]}") from None
    except ValueError:
        resolved = ""  # no HOST:PORT: refused below, in kvbench's words
    if resolved is None:
        return None
    host, _, port = resolved.rpartition(":")
    return _host_port(address, host, port)


def _host_port(address: str, host: str, port: str) -> tuple[str, int]:
    if not host or not port.isdigit():
        raise KVBenchError(f"--ray-address {address} is not a Ray address; give HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


class SweepWorker:
    """One Ray actor: the model loaded once, the sweep's calibrated methods and row context, units on demand."""

    def __init__(self, model: str, device: str, dtype: str, threads: int, methods: list, context) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from kvbench.harness.models.loading import load_model

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.problem = None  # a user error (the model does not load here) is said by the driver, in one line
        try:
            self.loaded = load_model(model, device, dtype)
        except KVBenchError as error:
            self.problem = str(error)
        self.methods = {method.label: method for method in methods}
        self.context = context
        self.threads = threads

    def ready(self) -> dict[str, Any]:
        device = None if self.problem else str(self.loaded.device)
        return {"pid": os.getpid(), "device": device, "threads": self.threads, "problem": self.problem}

    def run(self, length: int, sample, cells: list[tuple[str, float]]) -> list[tuple[str, float, list[dict]]]:
        if self.problem:
            raise KVBenchError(f"a Ray worker could not load the model: {self.problem}")
        todo = [(self.methods[label], budget) for label, budget in cells]
        return _run_unit(self.loaded, length, sample, todo, self.context)


def _run_unit(loaded, length, sample, todo, context):
    from kvbench.harness.runner.sweep import unit_cells

    return unit_cells(loaded, length, sample, todo, context)


def _connect(ray, address: str | None, timeout: float) -> bool:
    """Join the given cluster, or start a local one; True when this call started Ray (and must stop it)."""
    if ray.is_initialized():  # a session the caller opened (a notebook, the tests): use it as it is
        return False
    env = {"env_vars": {"TQDM_DISABLE": "1"}}
    check_cluster(address, timeout)
    try:
        if address:
            ray.init(address=address, runtime_env=env, logging_level="WARNING", log_to_driver=True)
        else:
            ray.init(
                address="local", runtime_env=env, include_dashboard=False, logging_level="WARNING", log_to_driver=True
            )
    except ConnectionError as error:
        raise KVBenchError(f"cannot reach the Ray cluster at {address}: {error}") from None
    return True


def _placement(ray, workers: int | None, device: str, units: int) -> tuple[int, dict[str, float], int]:
    """(actors, Ray resources per actor, torch threads per actor): one GPU each on CUDA, else the cluster's CPUs
    split evenly (`--workers` unset: one actor per GPU, or per node); never more actors than units. What the
    nodes cannot hold is refused at once rather than left waiting for resources that never come."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    cpus = sum(int(node.get("CPU", 0)) for node in nodes)
    if workers is None:
        workers = max(1, gpus if device == "cuda" and gpus else len(nodes))
    workers = min(workers, units)
    if device == "cuda":
        if gpus < workers:
            raise KVBenchError(f"--workers {workers} needs {workers} GPUs but the Ray cluster has {gpus}")
        return workers, {"num_gpus": 1, "num_cpus": 1}, max(1, cpus // workers)
    for threads in range(max(1, cpus // workers), 0, -1):  # the most threads each that the nodes can hold
        if sum(int(node.get("CPU", 0)) // threads for node in nodes) >= workers:
            return workers, {"num_cpus": threads}, threads
    raise KVBenchError(f"--workers {workers} needs {workers} CPUs but the Ray cluster has {cpus}")


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'no message'}"


def run_units(
    spec,
    loaded,
    plan: list[tuple[int, Any, list]],
    methods: list,
    context,
    record: Callable[[list[dict[str, Any]], str, int], None],
) -> None:
    """Run every unit of `plan` ((length, sample, todo) each) on Ray actors; `record(rows, where, cells)` is the
    driver's one way into the store, called for each unit as it finishes (or fails for good)."""
    require_ray()
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError, WorkerCrashedError

    from kvbench.harness.runner.sweep import failed_unit_rows

    started = _connect(ray, spec.ray_address, spec.ray_timeout)
    device, dtype = loaded.device.type, str(loaded.dtype).removeprefix("torch.")
    actors: list = []
    try:
        if not plan:
            return
        workers, resources, threads = _placement(ray, spec.workers, device, len(plan))
        remote = ray.remote(**resources, max_restarts=0)(SweepWorker)

        def spawn():
            actor = remote.remote(spec.model, device, dtype, threads, methods, context)
            actors.append(actor)
            return actor

        idle = [spawn() for _ in range(workers)]
        try:
            infos = ray.get([actor.ready.remote() for actor in idle], timeout=READY_TIMEOUT_S)
        except GetTimeoutError:
            raise KVBenchError(
                f"{workers} Ray workers were not all placed within {READY_TIMEOUT_S:.0f} s; "
                f"the cluster lacks {resources} for each: use fewer --workers"
            ) from None
        except (ActorDiedError, RayTaskError) as error:  # a worker that cannot start: no retry helps
            last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
            raise KVBenchError(f"a Ray worker could not start: {last}") from None
        problems = [info["problem"] for info in infos if info["problem"]]
        if problems:
            raise KVBenchError(f"a Ray worker could not load the model: {problems[0]}")
        print(
            f"kvbench: {workers} Ray workers on {infos[0]['device']}, {threads} torch threads each",
            file=sys.stderr,
        )

        pending = deque(range(len(plan)))
        attempts = [0] * len(plan)
        running: dict[Any, tuple[Any, int]] = {}
        while pending or running:
            while pending and idle:
                unit = pending.popleft()
                actor = idle.pop()
                length, sample, todo = plan[unit]
                cells = [(method.label, budget) for method, budget in todo]
                running[actor.run.remote(length, sample, cells)] = (actor, unit)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, unit = running.pop(ref)
            length, sample, todo = plan[unit]
            first = sample[0] if isinstance(sample, list) else sample  # a list: one context's questions
            where = f"{first.task}@{length} #{first.sample_id}"
            try:
                finished = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, WorkerCrashedError) as error:
                attempts[unit] += 1
                ray.kill(actor)
                if attempts[unit] < MAX_ATTEMPTS:
                    print(
                        f"kvbench: a Ray worker died running {where}; retrying it ({_reason(error)})", file=sys.stderr
                    )
                    pending.appendleft(unit)
                else:
                    reason = f"unit failed: its Ray worker died {attempts[unit]} times ({_reason(error)})"
                    record(failed_unit_rows(loaded, length, sample, todo, context, reason), where, len(todo))
                if pending:
                    idle.append(spawn())  # a fresh actor (Ray places it where the resources are) takes the next unit
                continue
            except RayTaskError as error:  # the unit raised: deterministic, as it would in-process
                cause = error.cause if isinstance(error.cause, BaseException) else error
                if isinstance(cause, KVBenchError):
                    raise KVBenchError(str(cause)) from None
                raise cause from None
            idle.append(actor)
            for _label, _budget, rows in finished:
                record(rows, where, 1)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()

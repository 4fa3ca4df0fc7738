"""Ray workers benchmark: one sweep's wall time with `--workers 1` (in one process) and `--workers N` (Ray actors),
back to back in this run, and their ratio; then whether both stores hold the same rows, timings aside.

Each sweep is a fresh `kvbench run` process into a fresh --out (interpreter start, imports, model load, Ray's
start-up and the actors' model loads included: what a user waits for). The task samples are generated into the
sample cache first, untimed, so neither run pays for them. Not a test: numbers depend on the machine, and on a
shared machine on what else runs.

    python benchmarks/ray_workers.py [--model smollm2-135m] [--workers 2] [--methods full,snapkv]
        [--budgets 0.25,0.5] [--tasks niah_single_1,passkey] [--lengths 1024] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURED = ("_s", "peak_memory_bytes")


def sweep(args: argparse.Namespace, out: Path, workers: int) -> float:
    command = [
        sys.executable,
        "-m",
        "kvbench.harness.cli.commands",
        "run",
        "--model",
        args.model,
        "--methods",
        args.methods,
    ]
    command += ["--budgets", args.budgets, "--tasks", args.tasks, "--lengths", args.lengths]
    command += ["--samples", str(args.samples), "--out", str(out), "--no-report", "--no-progress"]
    command += ["--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def rows(out: Path) -> list[dict]:
    found = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    stripped = [{k: v for k, v in row.items() if not k.endswith(MEASURED)} for row in found]
    return sorted(stripped, key=lambda r: (r["task"], r["length"], r["sample_id"], r["method_label"], r["budget"]))


def warm_samples(args: argparse.Namespace) -> None:
    from kvbench.harness.models.loading import load_model
    from kvbench.harness.runner.lists import parse_lengths, parse_list
    from kvbench.harness.runner.sweep import default_sample_cache
    from kvbench.tasks import generate_samples

    tokenizer = load_model(args.model, "cpu").tokenizer
    for task in parse_list(args.tasks, "tasks"):
        for length in parse_lengths(args.lengths):
            generate_samples(task, tokenizer, length, args.samples, 42, False, cache_dir=default_sample_cache())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="full,snapkv")
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--tasks", default="niah_single_1,passkey")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    warm_samples(args)
    with tempfile.TemporaryDirectory(prefix="kvbench-ray-bench-") as scratch:
        one = sweep(args, Path(scratch) / "one", 1)
        print(f"--workers 1: {one:.1f} s", flush=True)
        many = sweep(args, Path(scratch) / "many", args.workers)
        print(f"--workers {args.workers}: {many:.1f} s", flush=True)
        print(f"ratio --workers {args.workers} / --workers 1 wall time: {many / one:.2f}")
        same = rows(Path(scratch) / "one") == rows(Path(scratch) / "many")
        print(f"same rows, timings aside: {'yes' if same else 'NO'}")
    sys.exit(0)


if __name__ == "__main__":
    main()

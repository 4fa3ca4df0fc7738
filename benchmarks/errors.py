"""How long a user waits for an argument error: the bad inputs of `kvbench run`, `generate`, `lm-eval` and
`report`, each run as its own process and timed from start to exit.

Every case must end with exit code 2 and one line on stderr. With --baseline DIR (a checkout of an earlier
commit, e.g. `git worktree add /tmp/kvbench-before HEAD~1`) each case runs against that checkout too, in the
same run, and the table shows before, after and their ratio. Not a test: timings depend on the machine.

    python benchmarks/errors.py [--baseline /tmp/kvbench-before] [--repeats 1] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "methods", "tasks", "reports")
RUN = ["run", "--methods", "full", "--budgets", "0.5", "--tasks", "niah_single_1", "--lengths", "512"]
GENERATE = ["generate", "--method", "full", "--budget", "0.5", "--prompt", "some context"]
LM_EVAL = ["lm-eval", "--methods", "full", "--budgets", "0.5", "--tasks", "arc_easy"]


def cases(scratch: Path) -> list[tuple[str, list[str]]]:
    """(name, kvbench arguments) per bad input; each is a valid command but for one argument."""
    out = ["--out", str(scratch / "run"), "--no-report"]
    blocker = scratch / "a-file"
    blocker.write_text("")
    return [
        ("run: budget 1.5", _set(RUN, "--budgets", "1.5") + out),
        ("run: unknown task", _set(RUN, "--tasks", "no_such_task") + out),
        ("run: --samples 0", RUN + ["--samples", "0"] + out),
        ("run: length beyond the model", _set(RUN, "--lengths", "100000") + out),
        ("run: unknown method", _set(RUN, "--methods", "no_such_method") + out),
        ("run: unwritable --out", RUN + ["--out", str(blocker / "run"), "--no-report"]),
        ("run: bad dtype", RUN + ["--dtype", "int8"] + out),
        ("generate: empty prompt", _set(GENERATE, "--prompt", "   ")),
        ("generate: unknown model", GENERATE + ["--model", "no-such-org/no-such-model"]),
        ("lm-eval: unknown task", _set(LM_EVAL, "--tasks", "no_such_lm_eval_task") + out),
        ("lm-eval: bad device", LM_EVAL + ["--device", "tpu"] + out),
        ("report: missing run dir", ["report", str(scratch / "no-such-run")]),
    ]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def import_tree(checkout: Path, scratch: Path) -> Path:
    """A directory that makes `import kvbench.harness` (and the rest) resolve to `checkout`'s sources."""
    tree = scratch / f"src-{abs(hash(str(checkout)))}"
    package = tree / "kvbench"
    if not package.exists():
        package.mkdir(parents=True)
        for name in PACKAGES:
            (package / name).symlink_to(checkout / name, target_is_directory=True)
    return tree


def cli_module(tree: Path) -> str:
    """The module whose `main` is the `kvbench` command in that checkout (before the sub-package layout it was
    `kvbench.harness.cli`)."""
    return (
        "kvbench.harness.cli.commands"
        if (tree / "kvbench" / "harness" / "cli" / "commands.py").exists()
        else "kvbench.harness.cli"
    )


def run_case(tree: Path, argv: list[str], scratch: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", cli_module(tree), *argv]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch)
    seconds = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return seconds, done.returncode, lines[-1] if lines else ""


def measure(tree: Path, argv: list[str], scratch: Path, repeats: int) -> tuple[float, str]:
    """Median seconds, and what the user saw: the error line, or why it is not a one-line error."""
    times, verdict = [], ""
    for _ in range(repeats):
        seconds, code, last = run_case(tree, argv, scratch)
        times.append(seconds)
        verdict = last if code == 2 and last.startswith("kvbench: error:") else f"exit {code}: {last[:100]}"
    return statistics.median(times), verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="checkout of an earlier commit to time the same cases on")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (the median is shown)")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvbench-errors-") as directory:
        scratch = Path(directory)
        selected = [(name, argv) for name, argv in cases(scratch) if not args.only or args.only in name]
        current = import_tree(REPO, scratch)
        baseline = import_tree(args.baseline.resolve(), scratch) if args.baseline else None
        width = max(len(name) for name, _ in selected)
        header = f"{'case':<{width}}  " + (f"{'before s':>9}  " if baseline else "") + f"{'after s':>8}"
        print(header + ("  ratio" if baseline else "") + "  message (after)")
        slowest = 0.0
        for name, argv in selected:
            cells = []
            if baseline is not None:
                before, verdict_before = measure(baseline, argv, scratch, args.repeats)
                if not verdict_before.startswith("kvbench: error:"):
                    raise SystemExit(f"{name}: the baseline checkout did not give a one-line error: {verdict_before}")
                cells.append(f"{before:>9.2f}")
            after, verdict = measure(current, argv, scratch, args.repeats)
            slowest = max(slowest, after)
            cells.append(f"{after:>8.2f}")
            if baseline is not None:
                cells.append(f"{before / after:>5.2f}x")
            print(f"{name:<{width}}  " + "  ".join(cells) + f"  {verdict}", flush=True)
        print(f"slowest error after: {slowest:.2f} s ({len(selected)} cases, median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

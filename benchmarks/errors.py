"""How long a user waits for an argument error: the bad inputs of `kvbench run`, `generate`, `lm-eval` and
`report`, each run as its own process and timed from start to exit.

Every case must end with exit code 2 and one line on stderr. With --baseline DIR (a checkout of an earlier
commit, e.g. `git worktree add /tmp/kvbench-before HEAD~1`) each case runs against that checkout too, in the
same run, and the table shows before, after and their ratio. Cases added after an input became an error (method
option values, `--device cuda`) may give no one-line error on an older checkout (a traceback, or a finished run):
their before is n/a, with what the baseline did, after one try. Not a test: timings depend on the machine.

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


def cuda_available() -> bool:
    """Whether torch sees a GPU (the `--device cuda` case is then no error), asked in a child process."""
    check = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0


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
        ("report: bad --length-bins", ["report", str(scratch / "no-such-run"), "--length-bins", "0,8k,4k"]),
        ("run: bad --length-bins", RUN + ["--length-bins", "0,4k,x"] + out),
        ("run: missing data set", _set(RUN, "--tasks", "longbench:hotpotqa") + out),
        *[(name, argv + ["--samples", "1"]) for name, argv in value_cases(scratch)],
    ]


# Inputs an older checkout may not refuse at all (see the module's docstring): each has its own --out, since an
# older checkout may run it to the end and leave a result store behind.
NEW_CASES = ("run: option window=abc", "run: option window=-3", "run: option epsilon=nan", "run: --device cuda")


def value_cases(scratch: Path) -> list[tuple[str, list[str]]]:
    def out(tag: str) -> list[str]:
        return ["--out", str(scratch / f"run-{tag}"), "--no-report"]

    return [
        ("run: option window=abc", _set(RUN, "--methods", "snapkv:window=abc") + out("abc")),
        ("run: option window=-3", _set(RUN, "--methods", "snapkv:window=-3") + out("window")),
        ("run: option epsilon=nan", _set(RUN, "--methods", "expected_attention:epsilon=nan") + out("nan")),
        ("run: --device cuda", RUN + ["--device", "cuda"] + out("cuda")),  # skipped where CUDA is present
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


def run_case(tree: Path, argv: list[str], scratch: Path, timeout: float | None = None) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", cli_module(tree), *argv]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.monotonic() - start, -1, f"still running after {timeout:g} s"
    seconds = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return seconds, done.returncode, lines[-1] if lines else ""


def measure(
    tree: Path, argv: list[str], scratch: Path, repeats: int, timeout: float | None = None, once_unless_error=False
) -> tuple[float, str]:
    """Median seconds, and what the user saw: the error line, or why it is not a one-line error (after which
    `once_unless_error` stops: an older checkout that runs the case to the end needs no second try)."""
    times, verdict = [], ""
    for _ in range(repeats):
        seconds, code, last = run_case(tree, argv, scratch, timeout)
        times.append(seconds)
        verdict = last if code == 2 and last.startswith("kvbench: error:") else f"exit {code}: {last[:100]}"
        if once_unless_error and not verdict.startswith("kvbench: error:"):
            break
    return statistics.median(times), verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="checkout of an earlier commit to time the same cases on")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (the median is shown)")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    parser.add_argument(
        "--baseline-timeout", type=float, default=600, help="seconds a baseline run of a new case may take"
    )
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
            if "--device" in argv and argv[argv.index("--device") + 1] == "cuda" and cuda_available():
                print(f"{name:<{width}}  skipped: CUDA is present, so --device cuda is no error here", flush=True)
                continue
            cells = []
            before = None
            note = ""
            if baseline is not None:
                new = name in NEW_CASES
                timeout = args.baseline_timeout if new else None
                seconds, verdict_before = measure(baseline, argv, scratch, args.repeats, timeout, new)
                if verdict_before.startswith("kvbench: error:"):
                    before = seconds
                elif new:
                    note = f"  [before, after {seconds:.0f} s: {verdict_before}]"
                else:
                    raise SystemExit(f"{name}: the baseline checkout did not give a one-line error: {verdict_before}")
                cells.append(f"{before:>9.2f}" if before is not None else f"{'n/a':>9}")
            after, verdict = measure(current, argv, scratch, args.repeats)
            slowest = max(slowest, after)
            cells.append(f"{after:>8.2f}")
            if baseline is not None:
                cells.append(f"{before / after:>5.2f}x" if before is not None else f"{'n/a':>6}")
            print(f"{name:<{width}}  " + "  ".join(cells) + f"  {verdict}{note}", flush=True)
        print(f"slowest error after: {slowest:.2f} s ({len(selected)} cases, median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

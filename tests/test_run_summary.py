"""`kvbench run` ends with the report's summary as a terminal table: same cells, same means and intervals."""

import re

import pytest

from kvbench.harness.cli.commands import main

METHODS = ["full", "snapkv", "streaming_llm"]
BUDGETS = ["0.25", "0.5"]


@pytest.fixture(autouse=True)
def sample_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))


def run_args(chat_model_dir, out, *extra):
    return [
        "run", "--model", chat_model_dir, "--methods", ",".join(METHODS), "--budgets", ",".join(BUDGETS),
        "--tasks", "niah_single_1,passkey", "--lengths", "1024", "--samples", "2", "--out", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


def report_summary(markdown: str) -> dict[tuple, tuple[str, str, str]]:
    """report.md's Summary table: (method, budget, metric, length) -> (score [CI], KV ratio, n)."""
    lines = markdown.split("**Summary per metric, length, method and budget**", 1)[1].strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, (cell.strip() for cell in line.strip().strip("|").split("|"))))
        key = (row["method"], row["budget"], row["metric"], row["length"])
        cells[key] = (row["mean over tasks [95% CI]"], row["KV ratio"], row["n"])
    return cells


def terminal_summary(stdout: str) -> dict[tuple, tuple[str, str, str]]:
    """The printed table: columns are separated by two or more spaces (a score's interval has single ones)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Summary (the numbers of report.md)"))
    header = re.split(r"\s{2,}", lines[start + 1].strip())
    assert set(lines[start + 2].replace(" ", "")) == {"-"}
    cells = {}
    for line in lines[start + 3 :]:
        if line.startswith("report: ") or not line.strip():
            break
        row = dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True))
        key = (row["method"], row["budget"], row["metric"], row["length"])
        assert key not in cells, f"two lines for {key}"
        cells[key] = (row["score [95% CI]"], row["KV ratio"], row["n"])
    return cells


def test_run_prints_the_reports_summary_then_the_report_path(chat_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(chat_model_dir, out)) == 0
    stdout = capsys.readouterr().out
    printed = terminal_summary(stdout)
    expected = report_summary((out / "report.md").read_text())
    assert printed == expected
    # one line per (method, budget, metric, length): full once, each method at each budget, both metrics
    metrics = {"string_match_all", "passkey_exact"}
    assert {(m, b) for m, b, _, _ in printed} == {("full", "1")} | {(m, b) for m in METHODS[1:] for b in BUDGETS}
    assert {(metric, length) for _, _, metric, length in printed} == {(metric, "1024") for metric in metrics}
    assert len(printed) == 2 * (1 + 2 * 2)
    assert all(re.fullmatch(r"\d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]", score) for score, _, _ in printed.values())
    assert stdout.rstrip().splitlines()[-1] == f"report: {out / 'report.html'}"

    # --no-report still prints the table (it reads only the store), and no report path
    assert main(run_args(chat_model_dir, out, "--no-report")) == 0
    stdout = capsys.readouterr().out
    assert terminal_summary(stdout) == expected
    assert "report: " not in stdout

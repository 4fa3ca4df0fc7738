"""The command line: user errors are one line and exit 2; generate prints what a user needs."""

import json
import re
import subprocess
import sys

import pytest

from kvbench.harness.cli.commands import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--method", "nope", "--budget", "0.5", "--prompt", "hi"],
            "unknown method 'nope'; valid methods: .*snapkv",
        ),
        (["generate", "--method", "snapkv", "--budget", "0", "--prompt", "hi"], r"budget 0 is outside \(0, 1\]"),
        (["generate", "--method", "snapkv", "--budget", "1.5", "--prompt", "hi"], r"budget 1.5 is outside \(0, 1\]"),
        (["generate", "--method", "snapkv", "--budget", "abc", "--prompt", "hi"], "not a number"),
        (["generate", "--method", "snapkv", "--budget", "0.5", "--prompt", "  "], "prompt is empty"),
        (
            ["generate", "--method", "snapkv", "--budget", "0.5", "--prompt-file", "/no/such/file"],
            "cannot read --prompt-file",
        ),
        (
            ["generate", "--model", "./no/such/model", "--method", "full", "--budget", "1", "--prompt", "hi"],
            "does not exist",
        ),
        (["generate", "--model", "missing.gguf", "--method", "full", "--budget", "1", "--prompt", "hi"], "GGUF file"),
        (
            ["generate", "--model", __file__, "--method", "full", "--budget", "1", "--prompt", "hi"],
            "test_cli.py is a file, not a model directory or a .gguf file",
        ),
        (
            ["generate", "--device", "tpu", "--method", "full", "--budget", "1", "--prompt", "hi"],
            "valid devices: auto, cpu, cuda",
        ),
        (["generate", "--dtype", "int3", "--method", "full", "--budget", "1", "--prompt", "hi"], "valid dtypes"),
        (["generate", "--method", "full", "--budget", "1"], "one of the arguments --prompt --prompt-file is required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: ")
    assert re.search(message, lines[0])
    assert "Traceback" not in err


def test_prompt_longer_than_the_model_is_refused(capsys, tiny_model_dir):
    prompt = " ".join(f"w{i % 200}" for i in range(2100))
    code, _, err = run_cli(
        capsys, "generate", "--model", tiny_model_dir, "--method", "full", "--budget", "1", "--prompt", prompt
    )
    assert code == 2 and "maximum length of 2048" in err


def test_budget_a_method_cannot_reach_is_one_line(capsys, tiny_model_dir):
    prompt = " ".join(f"w{i}" for i in range(40))
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        tiny_model_dir,
        "--method",
        "streaming_llm",
        "--budget",
        "0.05",
        "--prompt",
        prompt,
    )
    assert code == 2 and "sink" in err and len(err.strip().splitlines()) == 1


def test_list_methods(capsys):
    code, out, _ = run_cli(capsys, "list", "methods")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert {"full", "random", "streaming_llm", "knorm", "snapkv", "pyramidkv", "adakv_snapkv"} <= set(names)


def test_generate_json_on_a_local_model(capsys, tiny_model_dir):
    prompt = " ".join(f"w{i}" for i in range(300))
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        tiny_model_dir,
        "--method",
        "snapkv",
        "--budget",
        "0.25",
        "--prompt",
        prompt,
        "--question",
        "w1 w2",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert code == 0, err
    record = json.loads(out)
    for key in ("output", "kv_bytes", "kv_bytes_full", "prefill_s", "compress_s", "decode_s", "new_tokens"):
        assert key in record
    assert record["kv_bytes"] / record["kv_bytes_full"] <= 0.27
    assert 1 <= record["new_tokens"] <= 5 and record["context_tokens"] > 300


def test_generate_takes_a_token_budget(capsys, tiny_model_dir, tmp_path):
    """--budget 64t: snapkv keeps exactly 64 tokens per KV head of the context (kv_bytes = 64/N of full), the record
    says budget_tokens 64 and the text line says @ 64t; with --save-cache the stored context keeps the same 64."""
    prompt = " ".join(f"w{i}" for i in range(300))
    args = ["generate", "--model", tiny_model_dir, "--method", "snapkv", "--budget", "64t", "--prompt", prompt]
    code, out, err = run_cli(capsys, *args, "--question", "w1 w2", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["budget_tokens"] == 64 and record["budget"] == 64.0
    assert record["kv_bytes"] * record["context_tokens"] == 64 * record["kv_bytes_full"]
    saved = tmp_path / "ctx.pt"
    code, out, err = run_cli(capsys, *args, "--max-new-tokens", "3", "--save-cache", str(saved))
    assert code == 0, err
    assert "@ 64t]" in err
    from kvbench.harness.engine.stored_context import read_context

    stored = read_context(saved)
    assert stored["kv_bytes"] * stored["context_length"] == 64 * stored["kv_bytes_full"]


def test_generate_text_output(capsys, tiny_model_dir):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        tiny_model_dir,
        "--method",
        "full",
        "--budget",
        "1",
        "--prompt",
        "w1 w2 w3",
        "--max-new-tokens",
        "3",
    )
    assert code == 0
    assert "kv_bytes" in err and "ms/token" in err


def test_console_script_reports_errors_without_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvbench.harness.cli.commands",
            "generate",
            "--method",
            "full",
            "--budget",
            "2",
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kvbench: error: budget 2 is outside (0, 1]; use a fraction of the full cache, e.g. 0.25"
    ]

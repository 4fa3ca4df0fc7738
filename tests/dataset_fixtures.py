"""What the data-set tests share: isolated caches, JSONL fixtures, counting compressions."""

from __future__ import annotations

import json


def isolate_caches(tmp_path, monkeypatch):
    """No local copy and an empty Hugging Face cache, offline: only what a test writes exists. Returns kvbench's
    data directory under `tmp_path`."""
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "kvbench-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "kvbench-cache" / "data"


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def snapkv_compressions(monkeypatch) -> list[int]:
    """The context length of every snapkv compression from now on (the list fills as they happen)."""
    from kvbench.methods import get_method

    snapkv = type(get_method("snapkv"))
    calls = []
    original = snapkv.compress

    def counting(self, observation, budget):
        calls.append(observation.context_length)
        return original(self, observation, budget)

    monkeypatch.setattr(snapkv, "compress", counting)
    return calls


def missing_data_set_line(model_dir: str, task: str, tmp_path, capsys, monkeypatch) -> str:
    """`kvbench run` on a data-set task with no data: asserts exit 2, one line, and that the model never loaded;
    returns the line."""
    import kvbench.harness.runner.sweep as sweep
    from kvbench.harness.cli.commands import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sweep, "load_model", no_load)
    argv = ["run", "--model", model_dir, "--methods", "full", "--budgets", "1", "--tasks", task,
            "--out", str(tmp_path / "run"), "--no-progress", "--no-report"]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line

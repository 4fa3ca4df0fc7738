"""The learned methods' shared plumbing: a recorded held-out split, one versioned checkpoint, one-line errors."""

import pytest
import torch
from conftest import build_tasks_tokenizer

from kvbench.harness.artifacts.training import FORMAT_VERSION, Trained, load_checkpoint, save_checkpoint, train_text
from kvbench.harness.cli.train import training_options
from kvbench.harness.errors import KVBenchError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tasks_tokenizer(chat_template=False)


def test_split_is_disjoint_recorded_and_rebuilds_from_its_record(tokenizer, tmp_path):
    extra = tmp_path / "notes.txt"
    extra.write_text("A local text file the user adds to the training text. " * 50, encoding="utf-8")
    split = train_text(tokenizer, tokens=4000, window=100, seed=3, heldout_fraction=0.25, text_files=[extra])
    record = split.record
    assert len(split.train) == 40 and len(split.heldout) == 10
    assert not set(record["train_offsets"]) & set(record["heldout_offsets"])
    assert all(len(w) == 100 for w in split.train + split.heldout)
    assert [s["name"] for s in record["sources"]][1] == str(extra.resolve())
    # The record alone rebuilds the windows from the same sources.
    from kvbench.methods.common.calibration_data import calibration_text

    ids = tokenizer.encode(calibration_text(), add_special_tokens=False)
    ids += tokenizer.encode(extra.read_text(encoding="utf-8"), add_special_tokens=False)
    assert split.heldout == [ids[o : o + 100] for o in record["heldout_offsets"]]
    assert train_text(tokenizer, 4000, 100, seed=3, heldout_fraction=0.25, text_files=[extra]).record == record
    assert train_text(tokenizer, 4000, 100, seed=4).record["train_offsets"] != record["train_offsets"]


def test_too_much_training_text_asked_is_one_line(tokenizer):
    with pytest.raises(KVBenchError, match="too few") as error:
        train_text(tokenizer, tokens=10**9, window=100)
    assert "\n" not in str(error.value)


def trained():
    return Trained({"w": torch.arange(6.0).reshape(2, 3)}, {"window": 8}, {"train": [1.0, 0.5], "heldout": 0.6})


def test_checkpoint_round_trip_keeps_every_record(tmp_path):
    path = save_checkpoint(tmp_path / "ae.pt", "autoencoder", {"latent_dim": 8}, trained(), "sha256:abc", {"s": 1})
    payload = load_checkpoint(path, "autoencoder", "sha256:abc", "tiny")
    assert payload["format_version"] == FORMAT_VERSION and payload["config"] == {"latent_dim": 8}
    assert payload["data"] == {"window": 8} and payload["losses"]["heldout"] == 0.6
    assert torch.equal(payload["artifacts"]["w"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("corrupt", "is corrupt or not a kvbench checkpoint"),
        ("missing", "does not exist"),
        ("method", "is snapkv's, not autoencoder's"),
        ("model", "was trained on another model"),
        ("version", "has format version 999"),
        ("foreign", "is not a kvbench checkpoint"),
    ],
)
def test_a_wrong_checkpoint_is_one_line_naming_the_fix(tmp_path, damage, expected):
    path = tmp_path / "ae.pt"
    method, fingerprint = "autoencoder", "sha256:abc"
    if damage == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif damage == "method":
        save_checkpoint(path, "snapkv", {}, trained(), fingerprint, {})
    elif damage == "model":
        save_checkpoint(path, method, {}, trained(), "sha256:other", {})
    elif damage == "version":
        save_checkpoint(path, method, {}, trained(), fingerprint, {})
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "format_version": 999}, path)
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(KVBenchError) as error:
        load_checkpoint(path, method, fingerprint, "smollm2-135m")
    message = str(error.value)
    assert expected in message and "'kvbench train autoencoder --model smollm2-135m --out FILE'" in message
    assert "\n" not in message


def test_training_options_come_from_the_config_fields():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:
        latent_dim: int = 16
        per_head: bool = False
        activation: str = "none"
        checkpoint: str = ""

    assert training_options("x", Config, ["--latent-dim", "8", "--per-head"]) == {"latent_dim": 8, "per_head": True}
    with pytest.raises(KVBenchError, match="unrecognized arguments: --checkpoint"):
        training_options("x", Config, ["--checkpoint", "a.pt"])
    with pytest.raises(KVBenchError, match="invalid int value"):
        training_options("x", Config, ["--latent-dim", "big"])


def test_kvbench_train_writes_a_checkpoint_that_a_sweep_uses(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`kvbench train autoencoder ... --out FILE`, then `autoencoder:checkpoint=FILE` in a sweep: the rows carry
    the checkpoint's weights fingerprint; a checkpoint made for another method is one line."""
    import json

    from kvbench.harness.cli.commands import main
    from kvbench.harness.provenance import tensors_fingerprint

    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "ae.pt"
    train = ["train", "autoencoder", "--model", tiny_model_dir, "--out", str(out), "--latent-dim", "8",
             "--tokens", "256", "--window", "128", "--epochs", "1"]  # fmt: skip
    assert main(train) == 0
    printed = capsys.readouterr().out
    assert "autoencoder:latent_dim=8" in printed
    # the hint names the options the checkpoint was trained with (a bare NAME:checkpoint= would be refused)
    assert "use --methods autoencoder:latent_dim=8:" in printed and f":checkpoint={out}" in printed
    payload = torch.load(out, weights_only=True)
    assert payload["config"]["latent_dim"] == 8 and payload["data"]["window"] == 128
    run = ["run", "--model", tiny_model_dir, "--methods", f"autoencoder:latent_dim=8:checkpoint={out}",
           "--budgets", "0.5", "--tasks", "niah_single_1", "--lengths", "512", "--samples", "1",
           "--out", str(tmp_path / "run"), "--no-progress", "--no-report"]  # fmt: skip
    assert run[4].startswith("autoencoder:")
    assert main(run) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert rows and all(row["artifact"] == tensors_fingerprint(payload["artifacts"]) for row in rows)
    wrong = tmp_path / "snap.pt"
    save_checkpoint(wrong, "snapkv", {}, trained(), "sha256:x", {})
    run[4] = f"autoencoder:checkpoint={wrong}"
    capsys.readouterr()
    assert main(run) == 2
    error = capsys.readouterr().err.strip()
    assert "is snapkv's, not autoencoder's" in error and "\n" not in error


def test_training_progress_bar_shows_under_the_clis_quiet_loaders():
    """The CLI sets TQDM_DISABLE=1 before tqdm is imported (to quiet the model loaders); kvbench's training bar
    must still be drawn. A fresh interpreter, because tqdm reads the variable when it is imported."""
    import subprocess
    import sys

    code = (
        "import os; os.environ['TQDM_DISABLE'] = '1'\n"
        "from kvbench.harness.artifacts.training import progress\n"
        "bar = progress(total=3, desc='kvbench: train x'); bar.update(3); bar.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "kvbench: train x: 100%" in result.stderr and "3/3" in result.stderr

"""Calibration artifacts: computed once per model and config, cached, reloaded; a corrupt file is one line."""

from dataclasses import dataclass

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import tiny_model, tiny_tokenizer

from kvbench.harness.artifacts.calibration import artifact_path, calibration_meta, ensure_calibrated
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods.base import Method
from kvbench.methods.common.calibration_data import calibration_ids, calibration_text


@dataclass(frozen=True)
class CountingConfig:
    """Test-only: 'calibrates' the mean key norm of each layer's first projection."""

    scale: float = 1.0


class Counting(Method):
    name = "counting"
    family = "test"
    description = "test-only"
    Config = CountingConfig
    needs_calibration = True
    calls = 0

    def _compress(self, observation, budget):
        raise NotImplementedError

    def calibrate(self, model, tokenizer):
        Counting.calls += 1
        return {"norms": torch.stack([layer.self_attn.k_proj.weight.norm() for layer in model.model.layers])}

    def load_calibration(self, artifacts):
        self.norms = artifacts["norms"] * self.config.scale


@pytest.fixture
def loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path))
    Counting.calls = 0
    return LoadedModel("tiny", "memory:tiny", tiny_model(), tiny_tokenizer(), torch.device("cpu"), torch.float32)


def test_calibrates_once_then_reuses_the_cache(loaded):
    messages = []
    first, second = Counting(), Counting()
    path = ensure_calibrated(loaded, first, say=messages.append)
    assert Counting.calls == 1 and path.exists() and "calibrating counting" in messages[0]
    assert ensure_calibrated(loaded, second, say=messages.append) == path
    assert Counting.calls == 1 and torch.equal(first.norms, second.norms)
    meta = calibration_meta(path)
    assert meta["model"] == "memory:tiny" and meta["data"] and meta["seconds"] >= 0


def test_config_changes_the_artifact(loaded):
    assert artifact_path(loaded, Counting()) != artifact_path(loaded, Counting(scale=2.0))


def test_force_recalibrates(loaded):
    ensure_calibrated(loaded, Counting(), say=lambda _: None)
    ensure_calibrated(loaded, Counting(), force=True, say=lambda _: None)
    assert Counting.calls == 2


def test_corrupt_artifact_is_one_clear_line(loaded):
    path = ensure_calibrated(loaded, Counting(), say=lambda _: None)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(KVBenchError, match="corrupt or unreadable; recreate it with 'kvbench calibrate counting"):
        ensure_calibrated(loaded, Counting(), say=lambda _: None)


def test_methods_without_calibration_are_left_alone(loaded):
    from kvbench.methods import get_method

    assert ensure_calibrated(loaded, get_method("snapkv")) is None


def test_calibration_data_is_offline_prose():
    text = calibration_text()
    assert len(text.split()) > 20000 and "\n " not in text
    tokenizer = build_tasks_tokenizer(chat_template=False)
    ids = calibration_ids(tokenizer, 500, seed=1)
    assert len(ids) == 500 and ids == calibration_ids(tokenizer, 500, seed=1) != calibration_ids(tokenizer, 500, seed=2)


def test_cli_says_which_methods_need_calibration(capsys):
    from kvbench.harness.cli.commands import main

    assert main(["calibrate", "snapkv"]) == 2
    assert "snapkv needs no calibration" in capsys.readouterr().err

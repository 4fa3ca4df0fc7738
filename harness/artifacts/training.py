"""Shared plumbing of the learned methods: offline text with a recorded held-out split, one versioned
checkpoint file, and a progress bar with loss and ETA (DESIGN §8).

A learned method's `calibrate` trains (through `train_text`, `progress`) and returns a `Trained`: its weights
plus the data record and losses. The harness writes that as one checkpoint file, in the calibration cache
(trained on demand) or where `kvbench train NAME --out FILE` says, and reads it back with every check a user
needs (format, method, model): a wrong or corrupt file is one line that names the command making a right one.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvbench.harness.errors import KVBenchError
from kvbench.harness.files import save_atomically

FORMAT = "kvbench-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Trained:
    """What a learned method's training produced: weights (named tensors) plus what a checkpoint records."""

    weights: dict[str, torch.Tensor]
    data: dict[str, Any]
    losses: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextSplit:
    """Token windows of offline text, split into train and held-out windows (disjoint), and their record."""

    train: list[list[int]]
    heldout: list[list[int]]
    record: dict[str, Any]


def _sources(text_files: Sequence[str | os.PathLike[str]]) -> list[tuple[str, str]]:
    from kvbench.methods.common.calibration_data import DATA_VERSION, calibration_text

    sources = [(DATA_VERSION, calibration_text())]
    for path in text_files:
        try:
            sources.append((str(Path(path).resolve()), Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as error:
            raise KVBenchError(f"cannot read --text-file {path}: {error.__class__.__name__}") from None
    return sources


def train_text(
    tokenizer,
    tokens: int,
    window: int,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    text_files: Sequence[str | os.PathLike[str]] = (),
) -> TextSplit:
    """About `tokens` training tokens in windows of `window` tokens from offline prose (Python's documentation
    topics, plus the user's text files), and held-out windows never trained on. Windows are whole, non-overlapping
    cuts of the concatenated text, drawn in a seeded order; the record names every source by hash and every window
    by its offset, so the split can be rebuilt and checked."""
    if tokens < window or window < 2:
        raise KVBenchError(f"--tokens {tokens} must hold at least one window of {window} tokens")
    sources = _sources(text_files)
    ids: list[int] = []
    for _, text in sources:
        ids += tokenizer.encode(text, add_special_tokens=False)
    offsets = list(range(0, len(ids) - window + 1, window))
    random.Random(seed).shuffle(offsets)
    train_count = min(math.ceil(tokens / window), len(offsets) - 1)
    heldout_count = max(1, math.ceil(train_count * heldout_fraction))
    if train_count < 1 or train_count + heldout_count > len(offsets):
        raise KVBenchError(
            f"the training text holds {len(offsets)} windows of {window} tokens, too few for {tokens} training "
            "tokens and a held-out split; add text with --text-file or lower --tokens"
        )
    train_offsets = sorted(offsets[:train_count])
    heldout_offsets = sorted(offsets[train_count : train_count + heldout_count])
    record = {
        "sources": [
            {"name": name, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "characters": len(text)}
            for name, text in sources
        ],
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
        "total_tokens": len(ids),
        "window": window,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "train_offsets": train_offsets,
        "heldout_offsets": heldout_offsets,
        "train_tokens": len(train_offsets) * window,
        "heldout_tokens": len(heldout_offsets) * window,
        "note": "the essay haystack of kvbench's tasks is the same documentation prose; scores of a learned method "
        "on those tasks are not on text unseen in training",
    }
    return TextSplit(
        [ids[o : o + window] for o in train_offsets], [ids[o : o + window] for o in heldout_offsets], record
    )


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "kvbench train") -> tqdm:
    """The training progress bar (stderr): steps, rate, ETA; set `bar.set_postfix(loss=...)` as it goes.

    `disable=False` explicitly: the CLI sets TQDM_DISABLE to silence the model loaders' bars, and tqdm takes that
    variable as the default of every bar it draws, which would hide this one too."""
    return tqdm(iterable, total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, disable=False)


def remake_command(method: str, model: str) -> str:
    return f"kvbench train {method} --model {model} --out FILE"


def save_checkpoint(
    path: str | os.PathLike[str],
    method: str,
    config: dict[str, Any],
    trained: Trained,
    model_fingerprint: str,
    meta: dict[str, Any],
) -> Path:
    """One file, written atomically: format and its version, method, model fingerprint, configuration,
    weights, data record, losses and run facts (time, device)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "model_fingerprint": model_fingerprint,
        "config": config,
        "settings": trained.settings,
        "artifacts": {name: tensor.detach().cpu().contiguous() for name, tensor in trained.weights.items()},
        "data": trained.data,
        "losses": trained.losses,
        "meta": meta,
    }
    try:
        save_atomically(payload, path)
    except OSError as error:
        raise KVBenchError(f"cannot write checkpoint {path}: {error.strerror or error}") from None
    return path


def load_checkpoint(
    path: str | os.PathLike[str], method: str, model_fingerprint: str | None, model_name: str
) -> dict[str, Any]:
    """The checkpoint's payload, after checking it is one: a missing, corrupt or foreign file, another format
    version, another method's or another model's checkpoint is one line with the command that makes a right one."""
    remake = remake_command(method, model_name)
    path = Path(path)
    if not path.is_file():
        raise KVBenchError(f"checkpoint {path} does not exist; make one with '{remake}'")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise KVBenchError(
            f"checkpoint {path} is corrupt or not a kvbench checkpoint; make one with '{remake}'"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KVBenchError(f"{path} is not a kvbench checkpoint; make one with '{remake}'")
    if payload.get("format_version") != FORMAT_VERSION:
        raise KVBenchError(
            f"checkpoint {path} has format version {payload.get('format_version')}, this kvbench reads "
            f"{FORMAT_VERSION}; make a new one with '{remake}'"
        )
    if payload.get("method") != method:
        raise KVBenchError(f"checkpoint {path} is {payload.get('method')}'s, not {method}'s; make one with '{remake}'")
    if model_fingerprint is not None and payload.get("model_fingerprint") != model_fingerprint:
        raise KVBenchError(
            f"checkpoint {path} was trained on another model ({payload.get('model_fingerprint')}, this is "
            f"{model_fingerprint}); make one with '{remake}'"
        )
    if not isinstance(payload.get("artifacts"), dict):
        raise KVBenchError(f"checkpoint {path} holds no weights; make one with '{remake}'")
    return payload

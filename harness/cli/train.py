"""`kvbench train NAME --model M ... --out FILE` for learned methods: the method's config fields are its options.

`--latent-dim 16` sets the config field `latent_dim`; a flag field takes `--per-head` / `--no-per-head`. The
trained weights go to one checkpoint file (`kvbench.harness.artifacts.training`), which `NAME:checkpoint=FILE` then uses;
without it the method trains on demand into the calibration cache with the same defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvbench.harness.errors import KVBenchError

# Config fields that name where weights come from, not how they are trained.
NOT_TRAINING_OPTIONS = frozenset({"checkpoint"})


class _OptionParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise KVBenchError(f"{message} (see 'kvbench train {self.prog} --help')")


def option_parser(method_name: str, config_type: type) -> argparse.ArgumentParser:
    """One `--field-name` per config field, typed from its default."""
    parser = _OptionParser(prog=method_name, add_help=True)
    defaults = config_type()
    for item in dataclasses.fields(config_type):
        if item.name in NOT_TRAINING_OPTIONS:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, (int, float, str)):
            parser.add_argument(flag, dest=item.name, type=type(default), default=None, help=f"default {default}")
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=item.name, action="append", default=None, help=f"default {default}")
    return parser


def training_options(method_name: str, config_type: type, argv: Sequence[str]) -> dict[str, Any]:
    """The config overrides the command line gives (only those it gives)."""
    parsed = option_parser(method_name, config_type).parse_args(list(argv))
    values = {name: value for name, value in vars(parsed).items() if value is not None}
    defaults = config_type()
    for name, value in values.items():
        if isinstance(getattr(defaults, name), tuple):
            values[name] = tuple(value)
    return values


def train_checkpoint(method, loaded, out: Path, say=lambda line: print(line, file=sys.stderr)) -> dict[str, Any]:
    """Train `method` on `loaded` and write its checkpoint to `out`; returns the checkpoint's summary."""
    from kvbench.harness.artifacts.calibration import _hand_over
    from kvbench.harness.artifacts.training import Trained, save_checkpoint
    from kvbench.harness.files import now
    from kvbench.harness.provenance import loaded_fingerprint

    say(
        f"kvbench: training {method.label} on {loaded.name} ({loaded.device}, {str(loaded.dtype).removeprefix('torch.')})"
    )
    start = time.perf_counter()
    trained = method.calibrate(loaded.model, loaded.tokenizer)
    seconds = time.perf_counter() - start
    if not isinstance(trained, Trained):
        raise RuntimeError(f"{method.name}.calibrate returned no Trained weights")
    meta = {
        "model": loaded.source,
        "dtype": str(loaded.dtype),
        "device": str(loaded.device),
        "seconds": round(seconds, 3),
        "created": now(),
    }
    save_checkpoint(out, method.name, method.config_record(), trained, loaded_fingerprint(loaded), meta)
    _hand_over(method, trained.weights, {"losses": trained.losses})
    return {"seconds": seconds, "losses": trained.losses, "fingerprint": method.artifact_fingerprint()}

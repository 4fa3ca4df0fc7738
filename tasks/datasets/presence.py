"""Whether a data set is surely absent, decided from the file system alone (no `datasets`, no torch): what lets
`kvbench run` say a missing data set in one line within a second, before the model loads.

A data set is found in a local file (`--data`, kvbench's data directory: the same places `catalog.locate` looks,
in its order) or in the user's Hugging Face cache. Reading that cache takes `datasets` (seconds to import); whether
it could hold the data set at all does not: the hub's download cache keeps a repository in
`HF_HUB_CACHE/datasets--ORG--NAME`, and `datasets` keeps what it prepared in `HF_DATASETS_CACHE/ORG___NAME` (its
name folded to snake case). With no local file and neither folder for any of the data set's hub copies, it is
absent; otherwise the run's own check (`catalog.locate`, through `datasets`) decides, as before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from kvbench.tasks.datasets import catalog


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    default = Path(xdg) / "huggingface" if xdg else Path.home() / ".cache" / "huggingface"
    return Path(os.environ.get("HF_HOME", default))


def hub_cache() -> Path:
    """huggingface_hub's download cache (HF_HUB_CACHE, the older HUGGINGFACE_HUB_CACHE, else HF_HOME/hub)."""
    given = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(given) if given else _hf_home() / "hub"


def datasets_cache() -> Path:
    """`datasets`' prepared-data cache (HF_DATASETS_CACHE, else HF_HOME/datasets)."""
    given = os.environ.get("HF_DATASETS_CACHE")
    return Path(given) if given else _hf_home() / "datasets"


def _folded(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def may_be_cached(hub_id: str) -> bool:
    """Whether either Hugging Face cache has a folder for this hub data set (not whether it holds the split)."""
    if (hub_cache() / f"datasets--{hub_id.replace('/', '--')}").exists():
        return True
    prepared = datasets_cache()
    if not prepared.is_dir():
        return False
    wanted = _folded(hub_id)
    return any(_folded(entry.name).startswith(wanted) for entry in prepared.iterdir() if "___" in entry.name)


def surely_missing(task: str, data: Mapping[str, Path], length: int | None) -> str | None:
    """The one-line message for a data-set task found nowhere (the message the run's own check gives), or None
    when it is present or may be (a local file, or a Hugging Face cache folder for one of its hub copies)."""
    located, looked = catalog.locate(task, data, length, hub=False)
    if located is not None:
        return None
    spec, subset = catalog.parse_task(task)
    if spec.hub_id is not None:
        config_split = spec.hub_config(subset, length)
        hub_ids = (spec.hub_id, *spec.other_hub_ids)
        if config_split is None:  # which copy depends on what is not known yet: the run decides
            return None
        if any(may_be_cached(hub_id) for hub_id in hub_ids):
            return None
        config, split = config_split
        looked += [
            f"the Hugging Face cache ({hub_id}{f' {config}' if config else ''}, split {split})" for hub_id in hub_ids
        ]
    return catalog.missing_message(task, looked)

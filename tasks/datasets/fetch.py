"""`kvbench data fetch TASK`: the only place kvbench downloads a data set, on the user's request.

It reads the data set's hub copy through `datasets` (network allowed) and writes its records as JSONL into
kvbench's data directory (`catalog.data_home()`), in the layout `catalog.locate` reads, so later runs find it
offline. RULER's official data is generated per model by NVIDIA/RULER (`--data ruler=DIR` reads its
`TASK/validation.jsonl`); fetch takes kvpress's pre-generated copy (`simonjegou/ruler`, one config per length).
"""

from __future__ import annotations

import json
import os

from kvbench.tasks.datasets import catalog
from kvbench.tasks.errors import TaskError


def fetch(task: str, length: int | None = None) -> str:
    """Download `task`'s records and write the local copy; returns where it went."""
    spec, subset = catalog.parse_task(task)
    config_split = spec.hub_config(subset, length)
    if spec.hub_id is None or config_split is None:
        if spec.name == "ruler":
            raise TaskError("fetching ruler needs --length N (kvpress's simonjegou/ruler has one config per length)")
        raise TaskError(f"{spec.name} has no hub copy: pass its rows with --data {spec.name}=PATH")
    try:
        import datasets
    except ImportError:
        raise TaskError("kvbench data fetch needs the datasets package: pip install datasets") from None
    config, split = config_split
    try:
        rows = datasets.load_dataset(spec.hub_id, config, split=split)
    except Exception as error:  # noqa: BLE001 - network, authentication, unknown config: one line
        raise TaskError(f"could not fetch {spec.hub_id} ({config or '-'}, {split}): {error}") from None
    records = [dict(row) for row in rows]
    if spec.name == "ruler":
        records = [row for row in records if row.get("task") == subset]
    target = catalog.data_home() / spec.name / spec.files(subset)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)  # a later run never reads half a copy
    return f"{len(records)} records -> {target}"

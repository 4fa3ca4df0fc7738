"""Modules that moved when kvbench took its sub-package layout: their old import paths still work.

Code written against the flat layout (a plug-in's `from kvbench.harness.prefill import Observation`, a script's
`kvbench.harness.models.load_model`) keeps running: an old module path imports the module at its new place, and
the packages that took an old module's name (`kvbench.harness.cache`, `.models`, `.cli`) hand out
that module's names. Each use says, as a DeprecationWarning, where the module lives now.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

MOVED: dict[str, str] = {
    "kvbench.harness.attention": "kvbench.harness.cache.attention",
    "kvbench.harness.batched_cache": "kvbench.harness.cache.batched",
    "kvbench.harness.batched_decode": "kvbench.harness.engine.batched_decode",
    "kvbench.harness.batched_settings": "kvbench.harness.engine.batched_settings",
    "kvbench.harness.calibration": "kvbench.harness.artifacts.calibration",
    "kvbench.harness.continuation": "kvbench.harness.engine.continuation",
    "kvbench.harness.decode": "kvbench.harness.engine.decode",
    "kvbench.harness.fast_checks": "kvbench.harness.cli.fast_checks",
    "kvbench.harness.latent_prefix": "kvbench.harness.cache.latent_prefix",
    "kvbench.harness.lm_eval_adapter": "kvbench.harness.lm_eval.adapter",
    "kvbench.harness.lm_eval_cli": "kvbench.harness.lm_eval.cli",
    "kvbench.harness.lm_eval_registration": "kvbench.harness.lm_eval.registration",
    "kvbench.harness.lm_eval_run": "kvbench.harness.lm_eval.run",
    "kvbench.harness.measure": "kvbench.harness.engine.measure",
    "kvbench.harness.model_cache": "kvbench.harness.models.gguf_cache",
    "kvbench.harness.pipeline": "kvbench.harness.engine.pipeline",
    "kvbench.harness.prefill": "kvbench.harness.engine.prefill",
    "kvbench.harness.prefix": "kvbench.harness.cache.prefix",
    "kvbench.harness.quantized_prefix": "kvbench.harness.cache.quantized_prefix",
    "kvbench.harness.ray_runner": "kvbench.harness.runner.ray_runner",
    "kvbench.harness.scoring_cells": "kvbench.harness.engine.scoring_cells",
    "kvbench.harness.store": "kvbench.harness.runner.store",
    "kvbench.harness.stored_context": "kvbench.harness.engine.stored_context",
    "kvbench.harness.sweep": "kvbench.harness.runner.sweep",
    "kvbench.harness.train_cli": "kvbench.harness.cli.train",
    "kvbench.harness.training": "kvbench.harness.artifacts.training",
    "kvbench.methods._adaptive_policy_features": "kvbench.methods.adaptive_policy.features",
    "kvbench.methods._adaptive_policy_training": "kvbench.methods.adaptive_policy.training",
    "kvbench.methods._attention_clustering_distill": "kvbench.methods.attention_clustering.distill",
    "kvbench.methods._autoencoder_training": "kvbench.methods.autoencoder.training",
    "kvbench.methods._calibration_data": "kvbench.methods.common.calibration_data",
    "kvbench.methods._eviction": "kvbench.methods.common.eviction",
    "kvbench.methods._head_scores": "kvbench.methods.common.head_scores",
    "kvbench.methods._kmeans": "kvbench.methods.attention_clustering.kmeans",
    "kvbench.methods._lightweight_features": "kvbench.methods.lightweight.features",
    "kvbench.methods._lightweight_training": "kvbench.methods.lightweight.training",
    "kvbench.methods._query_log": "kvbench.methods.common.query_log",
    "kvbench.methods._scorers": "kvbench.methods.common.scorers",
    "kvbench.tasks.cache": "kvbench.tasks.generated.sample_cache",
    "kvbench.tasks.cwe": "kvbench.tasks.generated.cwe",
    "kvbench.tasks.fitting": "kvbench.tasks.generated.fitting",
    "kvbench.tasks.fwe": "kvbench.tasks.generated.fwe",
    "kvbench.tasks.haystacks": "kvbench.tasks.generated.haystacks",
    "kvbench.tasks.loaders": "kvbench.tasks.datasets.loaders",
    "kvbench.tasks.niah": "kvbench.tasks.generated.niah",
    "kvbench.tasks.passkey": "kvbench.tasks.generated.passkey",
    "kvbench.tasks.perplexity": "kvbench.tasks.generated.perplexity",
    "kvbench.tasks.quality": "kvbench.tasks.metrics.quality",
    "kvbench.tasks.reconstruction": "kvbench.tasks.generated.reconstruction",
    "kvbench.tasks.scoring": "kvbench.tasks.metrics.scoring",
    "kvbench.tasks.templates": "kvbench.tasks.generated.templates",
    "kvbench.tasks.vt": "kvbench.tasks.generated.vt",
    "kvbench.tasks.words": "kvbench.tasks.generated.words",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)


class _MovedModuleFinder:
    """Finds an old module path and loads it as the module at its new place (the same module object): a meta path
    finder and loader by protocol (subclassing importlib.abc's ABCs would cost every `import kvbench.harness`)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        _warn(spec.name, MOVED[spec.name])
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the old path's: put it back
        return module

    def exec_module(self, module) -> None:
        """The module at the new place is executed already; only its own spec is restored."""
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def forward_names(package: str, module: str) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`, which took the name of the flat layout's module now at `module`:
    names the package does not have come from that module."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(module)
        if not hasattr(target, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        _warn(f"{package}.{name}", f"{module}.{name}")
        return getattr(target, name)

    return __getattr__

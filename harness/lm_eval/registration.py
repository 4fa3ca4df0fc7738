"""Register `kvbench` with lm-eval's model registry without importing the adapter (or torch) until it is used.

lm-eval resolves models by name, so the name must be registered before `simple_evaluate(model="kvbench")`.
`kvbench.harness` calls `register()` on import: when lm-eval is installed it records only the adapter's import
path, which costs lm-eval's small registry module (standard library only), never HFLM or the datasets stack.
"""

from __future__ import annotations

import importlib.util

MODEL_NAME = "kvbench"
ADAPTER = "kvbench.harness.lm_eval.adapter:KVBenchLM"


def register() -> bool:
    """Register the lazy `kvbench` model name; False when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        return False
    # lm-eval imports its own model table only while its registry is empty; fill it first so that
    # registering kvbench does not hide "hf" and the other built-in names.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ADAPTER)
    return True

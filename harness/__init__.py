"""kvbench.harness. Importing it checks the installed dependency versions (one line when one is out of range:
see requirements) and registers the lm-eval model name `kvbench` (lazily: see lm_eval.registration); the flat layout's module paths
keep working (see moved)."""

import os as _os
import sys as _sys

from kvbench.harness.requirements import DependencyError as _DependencyError
from kvbench.harness.requirements import check as _check_requirements


def _started_as_cli() -> bool:
    """The `kvbench` console script, or `python -m kvbench.<module>`: their user gets the CLI's one line."""
    if _sys.argv and _os.path.basename(_sys.argv[0]) == "kvbench":
        return True
    orig = getattr(_sys, "orig_argv", [])
    module = orig[orig.index("-m") + 1] if "-m" in orig[:-1] else ""
    return module.startswith("kvbench.")


try:
    _check_requirements()
except _DependencyError as _error:
    if _started_as_cli():
        print(f"kvbench: error: {_error}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise

from kvbench.harness import moved as _moved  # noqa: E402
from kvbench.harness.lm_eval.registration import register as _register_lm_eval_model  # noqa: E402

_moved.install()
_register_lm_eval_model()

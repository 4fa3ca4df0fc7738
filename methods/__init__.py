"""Compression methods, one module per method (a package per learned method), registered by name on import.

A new method is one new module here that decorates its class with `register`; `load_all` imports every
module and sub-package of this package, so nothing else changes (`common/` holds what several methods share). Other packages add methods through entry points of the group
`kvbench.methods` (see `load_plugins`): no fork of kvbench needed.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from importlib import metadata
from types import ModuleType

from kvbench.harness.cache.prefix import LayerPrefix, LowRankPrefix, TokenPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import BudgetError
from kvbench.harness.method_spec import OptionError, option
from kvbench.harness.plugins import distribution_label, method_entry_points
from kvbench.methods.base import REGISTRY, Calibration, DecodeTime, Method, OwnPrefill, get_method, register

# What a method's module needs from kvbench (the Method API, the values its options admit, what the prefill
# observed, what a layer keeps, the refusal of a budget) comes from here, so a method writer imports one package.
__all__ = [
    "REGISTRY",
    "BudgetError",
    "Calibration",
    "DecodeTime",
    "LayerPrefix",
    "LowRankPrefix",
    "Method",
    "Observation",
    "ObservationNeeds",
    "OptionError",
    "OwnPrefill",
    "TokenPrefix",
    "failed_plugins",
    "get_method",
    "list_methods",
    "load_all",
    "load_plugins",
    "method_origin",
    "option",
    "register",
]

BUILT_IN = "built-in"

# Per method name registered by a plug-in: "DIST VERSION" of the distribution that declared it.
_PLUGIN_ORIGINS: dict[str, str] = {}
# Per plug-in that failed: the one line said on stderr (said once per process, however often load_all runs).
_FAILED: dict[str, str] = {}
_plugins_loaded = False


def load_all() -> None:
    """Register every built-in method, then every installed plug-in's (built-ins first, so a plug-in that
    reuses a built-in name is the one refused)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    load_plugins()


def load_plugins() -> None:
    """Load each entry point of `kvbench.methods` once per process. A plug-in that raises, registers a name
    another method has, or registers nothing is said in one line on stderr and leaves the registry as it was;
    the other plug-ins and the built-ins are unaffected."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in method_entry_points():
        origin = distribution_label(entry_point)
        before = dict(REGISTRY)
        try:
            added = _load_plugin(entry_point)
        except Exception as error:  # noqa: BLE001 - any failure of foreign code is reported, never raised
            REGISTRY.clear()
            REGISTRY.update(before)
            message = " ".join(f"{type(error).__name__}: {error}".split())
            line = f"kvbench: plug-in {entry_point.name} (dist {origin}) failed to load: {message}"
            _FAILED[entry_point.name] = line
            print(line, file=sys.stderr)
            continue
        for name in added:
            _PLUGIN_ORIGINS[name] = origin


def _load_plugin(entry_point: metadata.EntryPoint) -> list[str]:
    """Import the entry point's module (its @register decorators register) or register the Method subclass it
    names; the names it provides."""
    before = set(REGISTRY)
    loaded = entry_point.load()
    if inspect.isclass(loaded) and issubclass(loaded, Method):
        register(loaded)
    elif not isinstance(loaded, ModuleType):
        raise TypeError(f"{entry_point.value} is neither a module nor a Method subclass")
    module = entry_point.module
    provided = set(REGISTRY) - before
    # A module imported before (by the user's own code) registered at that time: its names are still its own.
    provided |= {
        name for name, cls in REGISTRY.items() if cls.__module__ == module or cls.__module__.startswith(module + ".")
    }
    if not provided:
        raise LookupError(f"{entry_point.value} registers no method; decorate its Method subclass with @register")
    return sorted(provided)


def method_origin(name: str) -> str:
    """Where a registered method comes from: built-in, the plug-in's `DIST VERSION`, or the module that
    registered it at run time."""
    cls = REGISTRY[name]
    if cls.__module__.startswith(f"{__name__}."):
        return BUILT_IN
    return _PLUGIN_ORIGINS.get(name, f"module {cls.__module__}")


def failed_plugins() -> dict[str, str]:
    """Per plug-in (entry point name) that failed to load in this process: the line said on stderr."""
    return dict(_FAILED)


def list_methods() -> list[tuple[str, str, str]]:
    """(name, family, one-line description) for every registered method, sorted by name."""
    load_all()
    return [(name, cls.family, cls.description) for name, cls in sorted(REGISTRY.items())]

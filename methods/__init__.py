"""Compression methods, one module per method, registered by name on import.

A new method is one new module here that decorates its class with `register`; `load_all` imports every
module of this package, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from kvbench.methods.base import REGISTRY, Method, get_method, register

__all__ = ["REGISTRY", "Method", "get_method", "list_methods", "load_all", "register"]


def load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_methods() -> list[tuple[str, str, str]]:
    """(name, family, one-line description) for every registered method, sorted by name."""
    load_all()
    return [(name, cls.family, cls.description) for name, cls in sorted(REGISTRY.items())]

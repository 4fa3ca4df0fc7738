"""Method options on the command line: `NAME:option=value:option=value` wherever a method is named.

Parsing the text needs nothing heavy (no torch, no method module), so the CLI can check its shape before any
slow import; turning the texts into typed config values needs the method's config dataclass
(`configured_options`). Each distinct configuration is its own cell, labelled by the options that differ from
the method's defaults (`method_label`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from kvbench.harness.errors import KVBenchError


@dataclass(frozen=True)
class MethodSpec:
    """A method named on the command line: its registered name and option texts, in the order given."""

    name: str
    options: tuple[tuple[str, str], ...] = ()


def parse_method_spec(text: str) -> MethodSpec:
    """`snapkv:window=32:kernel=7` -> MethodSpec("snapkv", (("window", "32"), ("kernel", "7")))."""
    name, *parts = text.strip().split(":")
    name = name.strip()
    if not name:
        raise KVBenchError(f"method {text!r} has no name; write NAME or NAME:option=value:option=value")
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise KVBenchError(f"method option {part!r} in {text!r} is not option=value (e.g. snapkv:window=32)")
        if key in options:
            raise KVBenchError(f"method {text!r} sets option {key} twice")
        options[key] = value
    return MethodSpec(name, tuple(options.items()))


def _option_list(config_type: type) -> str:
    fields = dataclasses.fields(config_type)
    if not fields:
        return "none"
    defaults = config_type()
    return ", ".join(f"{f.name}={_format(getattr(defaults, f.name))}" for f in fields)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_value(text: str, default: Any) -> Any:
    """The option text as the type of its default (bool, int, float, str); None defaults take JSON."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, str):
        return text
    if default is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    raise ValueError(f"options of type {type(default).__name__} cannot be set on the command line")


def configured_options(method_name: str, config_type: type, spec: MethodSpec) -> dict[str, Any]:
    """Typed overrides of `config_type`'s defaults; an unknown option or a bad value is one line that lists the
    valid options and their defaults."""
    defaults = config_type()
    names = {f.name for f in dataclasses.fields(config_type)}
    typed: dict[str, Any] = {}
    for key, text in spec.options:
        if key not in names:
            raise KVBenchError(
                f"{method_name} has no option {key!r}; its options (defaults): {_option_list(config_type)}"
            )
        default = getattr(defaults, key)
        try:
            typed[key] = _parse_value(text, default)
        except ValueError as error:
            raise KVBenchError(
                f"{method_name} option {key}={text!r} is not a valid {type(default).__name__} ({error}); "
                f"its options (defaults): {_option_list(config_type)}"
            ) from None
    return typed


def method_config(config: Any) -> dict[str, Any]:
    """Every field of a method's config, as JSON values (the full configuration a row records)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def method_label(name: str, config: Any) -> str:
    """The method's name plus the options that differ from its defaults, in field order: one report line each."""
    defaults = type(config)()
    changed = [
        f"{f.name}={_format(getattr(config, f.name))}"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(defaults, f.name)
    ]
    return ":".join([name, *changed])

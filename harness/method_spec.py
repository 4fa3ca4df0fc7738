"""Method options on the command line: `NAME:option=value:option=value` wherever a method is named.

Parsing the text needs nothing heavy (no torch, no method module), so the CLI can check its shape before any
slow import; turning the texts into typed config values needs the method's config dataclass
(`configured_options`). Each distinct configuration is its own cell, labelled by the options that differ from
the method's defaults (`method_label`).

Each config field declares the values it admits beside its default, `window: int = option(64, at_least=1)`, with
literal arguments only: the runtime reads them from the field's metadata (`check_values`, called by
`Method.__init__`), and `kvbench.harness.cli.fast_checks` reads the same call from the source with `ast`, before
torch is imported, so both give the same one-line refusal.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from kvbench.harness.errors import KVBenchError

# The key of a config field's metadata that holds its `Allowed` values.
ALLOWED = "kvbench.allowed"


class OptionError(KVBenchError):
    """A method option its config does not admit. Messages raised by a config's own checks do not name the
    method (the config does not know it): whoever builds the method puts its name in front."""


@dataclass(frozen=True)
class Allowed:
    """The values a config field admits besides its type (taken from its default): bounds, inclusive (`at_least`,
    `at_most`) or exclusive (`above`, `below`), a fixed set (`choices`), or odd integers (`odd`). Floats are
    always finite."""

    at_least: int | float | None = None
    above: int | float | None = None
    at_most: int | float | None = None
    below: int | float | None = None
    choices: tuple | None = None
    odd: bool = False

    def __post_init__(self) -> None:
        if self.at_least is not None and self.above is not None:
            raise TypeError("give at_least or above, not both")
        if self.at_most is not None and self.below is not None:
            raise TypeError("give at_most or below, not both")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    def problem(self, value: Any, default: Any) -> str | None:
        """Why `value` is not admitted ("not an integer", "out of range", ...), None when it is; the type is the
        default's."""
        kind = _kind_problem(value, default)
        if kind is not None:
            return kind
        if self.choices is not None and value not in self.choices:
            return "out of range"
        if isinstance(value, float) and not math.isfinite(value):
            return "out of range"
        low = (self.at_least is not None and value < self.at_least) or (self.above is not None and value <= self.above)
        high = (self.at_most is not None and value > self.at_most) or (self.below is not None and value >= self.below)
        if low or high or (self.odd and value % 2 == 0):
            return "out of range"
        return None

    def describe(self, default: Any) -> str:
        """What a field with this default admits, as the end of "window must be ..."."""
        if isinstance(default, bool):
            return "true or false"
        if self.choices is not None:
            return "one of " + ", ".join(format_value(choice) for choice in self.choices)
        lower = (f"[{_bound(self.at_least)}", f">= {_bound(self.at_least)}") if self.at_least is not None else None
        if self.above is not None:
            lower = (f"({_bound(self.above)}", f"> {_bound(self.above)}")
        upper = (f"{_bound(self.at_most)}]", f"<= {_bound(self.at_most)}") if self.at_most is not None else None
        if self.below is not None:
            upper = (f"{_bound(self.below)})", f"< {_bound(self.below)}")
        if isinstance(default, int):
            noun = "an odd integer" if self.odd else "an integer"
        elif isinstance(default, float):
            noun = "a number" if lower and upper else "a finite number"
        else:
            noun = "a string"
        if lower and upper:
            return f"{noun} in {lower[0]}, {upper[0]}"
        bound = lower or upper
        return f"{noun} {bound[1]}" if bound else noun


def option(
    default: Any,
    *,
    at_least: int | float | None = None,
    above: int | float | None = None,
    at_most: int | float | None = None,
    below: int | float | None = None,
    choices: tuple | None = None,
    odd: bool = False,
) -> Any:
    """A config field with its default and the values it admits (see `Allowed`). Write every argument as a
    literal, or as a name bound to a literal at the top of the same module: the CLI reads them from the source."""
    allowed = Allowed(at_least, above, at_most, below, choices, odd)
    if allowed.problem(default, default) is not None:
        raise ValueError(f"default {default!r} is not {allowed.describe(default)}")
    return dataclasses.field(default=default, metadata={ALLOWED: allowed})


def allowed_values(field: dataclasses.Field) -> Allowed:
    """A field's declared values; a field declared without `option` admits every value of its type."""
    return field.metadata.get(ALLOWED, Allowed())


def option_problem(name: str, value: Any, default: Any, allowed: Allowed) -> str | None:
    """The refusal of `value` for option `name` (without the method's name), or None when it is admitted."""
    problem = allowed.problem(value, default)
    if problem is None:
        return None
    return f"option {name}={format_value(value)} is {problem}; {name} must be {allowed.describe(default)}"


def parse_option(name: str, text: str, default: Any, allowed: Allowed) -> Any:
    """The option's text as the type of its default; text of another type is an `OptionError` naming the type."""
    try:
        return _parse_value(text, default)
    except ValueError:
        if not isinstance(default, (bool, int, float, str)):
            raise OptionError(
                f"option {name}={text} cannot be set in a method spec (a {type(default).__name__})"
            ) from None
        problem = _kind_problem(text, default)
        raise OptionError(f"option {name}={text} is {problem}; {name} must be {allowed.describe(default)}") from None


def check_values(config_type: type, values: dict[str, Any]) -> None:
    """Refuse (`OptionError`, without the method's name) the first of `values`, in field order, that its field
    does not admit."""
    defaults = config_type()
    for field in dataclasses.fields(config_type):
        if field.name in values:
            problem = option_problem(
                field.name, values[field.name], getattr(defaults, field.name), allowed_values(field)
            )
            if problem is not None:
                raise OptionError(problem)


def _kind_problem(value: Any, default: Any) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "not true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "not an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "not a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "not a string"
    return None


def _bound(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


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
    return ", ".join(f"{f.name}={format_value(getattr(defaults, f.name))}" for f in fields)


def format_value(value: Any) -> str:
    """An option value as labels and messages print it: true/false for bools."""
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
    """Typed overrides of `config_type`'s defaults, in the order given; an unknown option lists the valid options
    and their defaults, a value of the wrong type names the type and range. Ranges are checked when the method is
    built (`check_values`)."""
    defaults = config_type()
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    typed: dict[str, Any] = {}
    for key, text in spec.options:
        if key not in fields:
            raise OptionError(
                f"{method_name} has no option {key!r}; its options (defaults): {_option_list(config_type)}"
            )
        try:
            typed[key] = parse_option(key, text, getattr(defaults, key), allowed_values(fields[key]))
        except OptionError as error:
            raise OptionError(f"{method_name}: {error}") from None
    return typed


def method_config(config: Any) -> dict[str, Any]:
    """Every field of a method's config, as JSON values (the full configuration a row records)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def method_label(name: str, config: Any) -> str:
    """The method's name plus the options that differ from its defaults, in field order: one report line each."""
    defaults = type(config)()
    changed = [
        f"{f.name}={format_value(getattr(config, f.name))}"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(defaults, f.name)
    ]
    return ":".join([name, *changed])

"""Shared helpers for config dataclasses: refuse unknown keys, build one from a mapping with typed coercion.

YAML and the command line hand over values that are right for a person but not for the field's type: PyYAML reads
``3e-4`` as a string (YAML 1.1 wants a dot in a float), ``--set unlearn.lr=3e-4`` is text, ``steps: 40.0`` is a
float. ``dataclass_from_dict`` converts each value to the type the field declares, or fails naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields
from typing import Any

from atu.errors import ConfigError

_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}


def check_keys(cls, data: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError naming ``where`` unless ``data`` is a mapping whose keys are all fields of ``cls``."""
    if not isinstance(data, dict):
        section = f" {prefix.rstrip('.')}:" if prefix else ""
        raise ConfigError(f"{where}:{section} expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}' (allowed{' in ' + prefix.rstrip('.') if prefix else ''}: "
            f"{', '.join(sorted(known))})"
        )


def dataclass_from_dict(cls, data: dict[str, Any], where: str, prefix: str = ""):
    """``cls(**data)`` with every value coerced to its field's declared type (nested dataclasses from mappings).

    Errors name ``where`` (a file or a section) and the dotted key (``prefix`` + field), and say what was received.
    A ConfigError from the class's own validation is prefixed with ``where`` too."""
    check_keys(cls, data, where, prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = coerce(hints[f.name], data[f.name], where, prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing key '{prefix}{f.name}'")
    try:
        return cls(**values)
    except ConfigError as e:
        if str(e).startswith(f"{where}:"):
            raise
        raise ConfigError(f"{where}: {e}") from None


def coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, lists, ``X | None``, dataclasses), or a ConfigError naming
    ``where`` and ``key``. Numbers written as text ("3e-4") become numbers; a bool is never taken for a number."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None:
            if type(None) in arms:
                return None
            raise fail(_describe(tp))
        real = [a for a in arms if a is not type(None)]
        if len(real) == 1:  # X | None with a value: X's own error names the exact item that is wrong
            return coerce(real[0], value, where, key)
        for arm in real:
            try:
                return coerce(arm, value, where, key)
            except ConfigError:
                pass
        raise fail(_describe(tp))
    if value is None:
        if dataclasses.is_dataclass(tp):
            return tp()
        raise fail(_describe(tp) + " (not null)")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return dataclass_from_dict(tp, value, where, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(_describe(tp))
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(tp, value, fail)


def _coerce_scalar(tp: Any, value: Any, fail) -> Any:
    """``value`` as bool, int, float or str (``tp``); anything else unchanged. ``fail(expected)`` is the error."""
    if tp is bool:
        if isinstance(value, bool):
            return value  # any other type passes as is
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value  # any other type passes as is
        number = _number(value)
        if number is None or not float(number).is_integer():
            raise fail("an integer")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        number = _number(value)
        if number is None:
            raise fail("a number")
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # `forget: [1984]` names a concept "1984"
            return str(value)
        raise fail("a string")
    return value  # any other type passes as is


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _describe(tp: Any) -> str:
    """A type as a person reads it: "a number", "a list of numbers", "a string or null"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a) for a in arms)
        return text + " or null" if len(arms) < len(typing.get_args(tp)) else text
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        inner = _describe(item)
        plural = {"a number": "numbers", "an integer": "integers", "a string": "strings"}
        return "a list of " + plural.get(inner, inner)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def type_name(tp: Any) -> str:
    """A short name for a field's type in the reference docs: float, int, list[float], str | null, ..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


# What a calibrated false-positive rate counts: "union", the texts any concept flags (what a guard over all the
# concepts does to clean traffic); "concept", each concept's texts on their own (the union grows with the count).
FPR_SCOPES = ("union", "concept")


def is_open_fraction(value: Any) -> bool:
    """Whether ``value`` is a number strictly between 0 and 1 (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < 1

"""Shared helpers for config dataclasses: refuse unknown keys, build one from a mapping."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from atu.errors import ConfigError


def check_keys(cls, data: Any, where: str) -> None:
    """Raise ConfigError naming ``where`` unless ``data`` is a mapping whose keys are all fields of ``cls``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")


def dataclass_from_dict(cls, data: dict[str, Any], where: str):
    """``cls(**data)``, with an error naming ``where`` and the allowed keys when a key is unknown."""
    check_keys(cls, data, where)
    return cls(**data)


def is_open_fraction(value: Any) -> bool:
    """Whether ``value`` is a number strictly between 0 and 1 (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < 1

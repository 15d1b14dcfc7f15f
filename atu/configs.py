"""Shared helper for config dataclasses: build one from a mapping, refusing unknown keys."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from atu.errors import ConfigError


def dataclass_from_dict(cls, data: dict[str, Any], where: str):
    """``cls(**data)``, with an error naming ``where`` and the allowed keys when a key is unknown."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
    return cls(**data)

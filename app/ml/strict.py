"""Reading the sections of model.json strictly: a key nobody reads is refused, so no written field goes unheeded."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

_Record = TypeVar("_Record")


def as_object(data: Any, section: str) -> dict[str, Any]:
    """`data` itself when it is a dict (a JSON object); ValueError naming the section if not."""
    if not isinstance(data, dict):
        raise ValueError(f"'{section}' must be an object, not {type(data).__name__}")
    return data


def check_keys(data: Any, known: set[str], section: str) -> dict[str, Any]:
    """`data` itself when it is a dict of known keys; ValueError naming the section and the unknown keys if not."""
    unknown = set(as_object(data, section)) - known
    if unknown:
        raise ValueError(f"'{section}' has unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
    return data


def from_fields(cls: type[_Record], data: Any, section: str) -> _Record:
    """An instance of the dataclass `cls` from a dict of its field names (missing ones take their defaults)."""
    return cls(**check_keys(data, {f.name for f in fields(cls)}, section))

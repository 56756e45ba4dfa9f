"""Parameter errors, and pydantic's validation errors said the way the rest of the project
says them: the full dotted key (`train.phase2.lr_lm`) and what is wrong with the value."""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

# pydantic error type -> what the value should have been
_EXPECTED = {
    "int_type": "int",
    "int_from_float": "int",
    "float_type": "float",
    "string_type": "str",
    "bool_type": "bool",
}
_CONTAINERS = {"list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping"}


class ConfigError(ValueError):
    """A parameter file that cannot be used; the message names file, line and key."""


class FieldError(ValueError):
    """A rule broken inside a section; `key` is relative to the section (`''`: the section itself)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def dotted(loc: tuple[str | int, ...]) -> str:
    """('train', 'phase2', 'lr_lm') -> 'train.phase2.lr_lm'; list positions as [i]."""
    key = ""
    for part in loc:
        if part == "[key]":  # the error is about a mapping's key, named by the part before
            continue
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> Any:
    """The annotation found by walking `loc` down from `model` (None where it leaves the models)."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        current = fields[part].annotation
    return current


def _message(error: dict, model: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, message) of one pydantic error."""
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    key = dotted(loc)
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), FieldError):
        cause = error["ctx"]["error"]
        key = ".".join(part for part in (key, cause.key) if part)
        return key, str(cause)
    if kind == "value_error":
        return key, str(error["ctx"]["error"])
    if kind == "extra_forbidden":
        known = getattr(_model_at(model, loc[:-1]), "model_fields", {})
        return key, f"unknown key (known: {', '.join(sorted(known))})"
    if kind == "literal_error":
        hint = _model_at(model, loc)
        allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        choices = ", ".join(map(str, allowed)) or error["ctx"]["expected"]
        return key, f"must be one of {choices}; got {value!r}"
    if kind in _EXPECTED:
        return key, f"expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r}"
    if kind in _CONTAINERS:
        return key, f"expected {_CONTAINERS[kind]}, got {type(value).__name__}"
    return key, error["msg"]


def first_error(exc: ValidationError, model: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, message) of the error to report: an unknown key first (a misspelt key
    explains the values that look wrong), else the first in declaration order."""
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    key, message = _message((unknown or errors)[0], model)
    return key or "params", message


def describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """'key: message' for the first error of a validation."""
    key, message = first_error(exc, model)
    return f"{key}: {message}"

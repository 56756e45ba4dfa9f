"""What every params section shares: a frozen pydantic model that forbids unknown keys and
checks types strictly (YAML's `true` is not an int, `5` is not a string), and the few value
types and checks the sections are written with.

A check that needs several fields is a `model_validator` named `_check` that raises `FieldError`
with the key it blames, relative to its section: the loader adds the section's own path
(`train.phase2.lr_lm`, not `lr_lm`), the file and the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, model_validator

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A parameter file that cannot be used; the message names file, line and key."""


class FieldError(ValueError):
    """A rule broken inside a section; `key` is relative to the section (`''`: the section itself)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as text: a number written so is still a number."""
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def rule(test: Callable[[Any], bool], wanted: str) -> AfterValidator:
    """A one-value check, failing with 'must be <wanted>, got <value>'."""

    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(f"must be {wanted}, got {value}")
        return value

    return AfterValidator(check)


Float = Annotated[float, BeforeValidator(_yaml_float)]
Key = Annotated[str, BeforeValidator(lambda key: key if isinstance(key, str) else str(key))]  # YAML `0:` is an int
NonNegative = rule(lambda v: v >= 0, ">= 0")
AtLeastOne = rule(lambda v: v >= 1, ">= 1")
Fraction = rule(lambda v: 0 <= v <= 1, "within [0, 1]")
OpenFraction = rule(lambda v: 0 <= v < 1, "within [0, 1)")


class Section(BaseModel):
    """A params section: frozen, unknown keys refused, types checked strictly, defaults checked too
    (every load checks every section, given or default: the whole config package runs each time).
    Built in code (`SftParams(format="yolo")`), a bad value raises pydantic's ValidationError;
    `params_from_dict` and `load_params` turn it into a ConfigError naming the key."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, validate_default=True, revalidate_instances="always"
    )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: use model_copy(update={{{name!r}: ...}})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    @model_validator(mode="before")
    @classmethod
    def _sections_keep_their_defaults(cls, data: Any) -> Any:
        """A partly given subsection keeps this field's own defaults (phase2's differ from phase1's)."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, info in cls.model_fields.items():
            value = data.get(name)
            default = info.get_default(call_default_factory=True)
            if name not in data or not isinstance(default, BaseModel):
                continue
            if value is None:
                merged[name] = default
            elif isinstance(value, dict):
                merged[name] = {**default.model_dump(), **value}
        return merged


def fail(key: str, message: str) -> None:
    """Raise the error of a `_check` validator: `key` relative to the section."""
    raise FieldError(key, message)

"""Params, the whole of a run's parameters: read from params.yaml and back to a plain dict.
Errors name the file, the line and the full dotted key
(`params.yaml:12: train.phase2.lr_lm: must be >= 0, got -1`)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from defectvlm.config.base import ConfigError, FieldError, Section
from defectvlm.config.cluster import ClusterParams, TrainJobParams
from defectvlm.config.data import (
    DataParams,
    IngestParams,
    LabelParams,
    ModelParams,
    RegionParams,
    SftParams,
    SplitParams,
)
from defectvlm.config.serve import ServeParams
from defectvlm.config.train import DetectorParams, RegistryParams, TrackingParams, TrainParams

# pydantic error type -> what the value should have been
_EXPECTED = {
    "int_type": "int",
    "int_from_float": "int",
    "float_type": "float",
    "string_type": "str",
    "bool_type": "bool",
}
_CONTAINERS = {"list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping"}


class Params(Section):
    """All parameters of a pipeline run (one section per step family)."""

    data: DataParams = Field(DataParams(), description="Input folders.")
    labels: LabelParams = Field(LabelParams(), description="Label parsing and class mapping.")
    ingest: IngestParams = Field(IngestParams(), description="Ingest checks.")
    split: SplitParams = Field(SplitParams(), description="Train/val/test split.")
    model: ModelParams = Field(ModelParams(), description="Model family and image budget.")
    regions: RegionParams = Field(RegionParams(), description="ROI candidates.")
    sft: SftParams = Field(SftParams(), description="SFT conversations.")
    train: TrainParams = Field(TrainParams(), description="Phased training.")
    tracking: TrackingParams = Field(TrackingParams(), description="Experiment tracking.")
    registry: RegistryParams = Field(RegistryParams(), description="Model registry and promotion gates.")
    detector: DetectorParams = Field(DetectorParams(), description="Proposal detector of the cascade (train-detector).")
    trainjob: TrainJobParams = Field(TrainJobParams(), description="Multi-node training (train.launcher: trainjob).")
    cluster: ClusterParams = Field(ClusterParams(), description="Kubeflow Pipelines: images, resources, secrets.")
    serve: ServeParams = Field(ServeParams(), description="The inspection service (defectvlm serve).")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; errors name the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return _validate(raw)
    except _Invalid as exc:
        line = _line_of(exc.key, _key_lines(text))
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {exc.key}: {exc.message}") from None


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a plain dict (as loaded from YAML) into Params."""
    try:
        return _validate(raw)
    except _Invalid as exc:
        raise ConfigError(f"{exc.key}: {exc.message}") from None


def params_to_dict(params: BaseModel) -> dict[str, Any]:
    """Plain-dict view of Params (or any section), for logging and resolved-params files:
    keys in declaration order, floats as floats."""
    return params.model_dump()


def field_docs(cls: type[BaseModel] = Params, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every leaf field, in declaration order."""
    rows = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            rows.extend(field_docs(info.annotation, key + "."))
        else:
            rows.append((key, info.description or "", info.get_default(call_default_factory=True)))
    return rows


class _Invalid(Exception):
    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message


def _validate(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise _Invalid("params", f"expected a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise _Invalid(*first_error(exc, Params)) from None


def _line_of(key: str, lines: dict[str, int]) -> int | None:
    """The line of `key`, else of the nearest enclosing key the file has (a rule on a default
    value is blamed on its section)."""
    while key:
        if key in lines:
            return lines[key]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return None


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key (list items as key[i]) -> 1-based line of that key or item in a YAML document."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[f"{prefix}[{index}]"] = item.start_mark.line + 1
                walk(item, f"{prefix}[{index}]")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def dotted(loc: tuple[str | int, ...]) -> str:
    """('train', 'phase2', 'lr_lm') -> 'train.phase2.lr_lm'; list positions as [i]."""
    key = ""
    for part in loc:
        if part == "[key]":  # the error is about a mapping's key, named by the part before
            continue
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _model_at(model: type[BaseModel] | None, loc: tuple[str | int, ...]) -> Any:
    """The annotation found by walking `loc` down from `model` (None where it leaves the models)."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        current = fields[part].annotation
    return current


def _message(error: dict, model: type[BaseModel] | None) -> tuple[str, str]:
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


def first_error(exc: ValidationError, model: type[BaseModel] | None) -> tuple[str, str]:
    """(dotted key, message) of the error to report: an unknown key first (a misspelt key
    explains the values that look wrong), else the first in declaration order."""
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    key, message = _message((unknown or errors)[0], model)
    return key or "params", message


def describe(exc: ValidationError) -> str:
    """'Section.key: message' for a section built in code from a recorded file (an adapter's
    prompt.json) that breaks a rule: pydantic names the section, the key and the rule."""
    key, message = _message(exc.errors()[0], None)
    return f"{exc.title}.{key}: {message}" if key else f"{exc.title}: {message}"

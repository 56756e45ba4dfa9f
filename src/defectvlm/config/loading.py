"""params.yaml -> Params, and back to a plain dict. Errors name the file, the line and the
full dotted key (`params.yaml:12: train.phase2.lr_lm: must be >= 0, got -1`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from defectvlm.config.errors import ConfigError, first_error
from defectvlm.config.params import Params


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

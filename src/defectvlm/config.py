"""params.yaml -> frozen dataclasses, one per section, validated on load.

Every field carries a one-line doc in its metadata (`param(default, "doc")`), which
`defectvlm params` prints. Loading rejects unknown keys, wrong types and impossible
values with a `ConfigError` naming the file, the line and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A parameter file that cannot be used; the message names file, line and key."""


def param(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class DataParams:
    """Where the raw image trees live."""

    abnormal_root: str = param("data/raw/abnormal_root", "Folder of defect images, each with a same-named label file.")
    normal_root: str = param("data/raw/normal_root", "Folder of normal images (no labels).")

    def __post_init__(self) -> None:
        if not self.abnormal_root or not self.normal_root:
            _fail("data", "abnormal_root and normal_root must both be set")
        if Path(self.abnormal_root) == Path(self.normal_root):
            _fail("data.normal_root", "must differ from data.abnormal_root")


LabelFormat = Literal["auto", "semicolon", "yolo", "labelstudio"]


@dataclass(frozen=True)
class LabelParams:
    """How label files are read and how raw labels map to canonical classes."""

    format: LabelFormat = param("auto", "Label format: semicolon | yolo | labelstudio | auto (decided per file).")
    coord_format: Literal["xyxy", "cxcywh"] = param("xyxy", "Meaning of the 4 numbers of a semicolon-format box.")
    label_map: dict[str, str] = param({}, "Raw label -> canonical class; empty means every raw label is its own class.")
    unknown_label: Literal["error", "other", "drop"] = param(
        "error", "A raw label missing from label_map: fail the run, map it to 'other', or drop the box."
    )

    def __post_init__(self) -> None:
        for raw, canonical in self.label_map.items():
            if not str(raw).strip() or not str(canonical).strip():
                _fail(f"labels.label_map.{raw}", "raw labels and classes must be non-empty")

    def canonical(self, raw: str) -> str | None:
        """The canonical class of a raw label, or None when the map does not know it."""
        if not self.label_map:
            return raw
        if raw in self.label_map:
            return self.label_map[raw]
        return raw if raw in self.label_map.values() else None


@dataclass(frozen=True)
class IngestParams:
    """How the ingest step checks images and boxes."""

    verify: Literal["header", "full"] = param(
        "header", "header: read size/EXIF from the header and check the end marker; full: decode every image."
    )
    exif_policy: Literal["labels_on_display", "labels_on_stored", "reject"] = param(
        "labels_on_display",
        "EXIF-rotated images: labels drawn on the displayed image (kept), on the stored pixels (rotated), or reject.",
    )
    min_box_size: float = param(4.0, "Boxes narrower or shorter than this many pixels are dropped.")
    duplicates: Literal["reject", "keep"] = param(
        "reject", "Identical content twice in one root: reject all copies but the first (by path), or keep all."
    )
    max_rejected_fraction: float = param(0.05, "Fail the step when more than this fraction of images is rejected.")
    image_extensions: list[str] = param(
        [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"], "File suffixes treated as images."
    )
    workers: int = param(0, "Processes for hashing and header reads; 0 means one per CPU core.")

    def __post_init__(self) -> None:
        if self.min_box_size < 0:
            _fail("ingest.min_box_size", f"must be >= 0, got {self.min_box_size}")
        if not 0 <= self.max_rejected_fraction <= 1:
            _fail("ingest.max_rejected_fraction", f"must be within [0, 1], got {self.max_rejected_fraction}")
        if self.workers < 0:
            _fail("ingest.workers", f"must be >= 0, got {self.workers}")
        for ext in self.image_extensions:
            if not ext.startswith("."):
                _fail("ingest.image_extensions", f"{ext!r} must start with '.'")


@dataclass(frozen=True)
class Params:
    """All parameters of a pipeline run (one section per step family)."""

    data: DataParams = param(DataParams(), "Input folders.")
    labels: LabelParams = param(LabelParams(), "Label parsing and class mapping.")
    ingest: IngestParams = param(IngestParams(), "Ingest checks.")


# --- loading -------------------------------------------------------------------------


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; errors name the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        lines = _key_lines(text)
        raw = yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {exc}") from None


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a plain dict (as loaded from YAML) into Params."""
    return _build(Params, raw, "")


def params_to_dict(params: Any) -> dict[str, Any]:
    """Plain-dict view of Params (or any section), for logging and resolved-params files."""
    return dataclasses.asdict(params)


def field_docs(cls: type = Params, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf field, in declaration order."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, f.metadata.get("doc", ""), default))
    return rows


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        _fail(prefix.rstrip(".") or "params", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - names)
    if unknown:
        _fail(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            _fail(key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is list:
        if not isinstance(value, list):
            _fail(key, f"expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        hint is bool
        and not isinstance(value, bool)
        or not isinstance(value, hint)
        or (hint is int and isinstance(value, bool))
    ):
        _fail(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a YAML document."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines

"""Label file parsers: semicolon (the factory format), YOLO, Label Studio, and auto.

Every parser turns text into `Labels`: boxes as x1,y1,x2,y2 either in pixels
(`frame="pixel"`) or as fractions of the image (`frame="unit"`), each with the raw
label text and the line it came from. Nothing here opens images or applies a label map;
bad input raises `LabelError` with a reason code, the line, and a message.
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Literal

LABEL_FORMATS = ("semicolon", "yolo", "labelstudio")
COLUMN_DELIMITERS = ";；"
_COLUMN_SPLIT = re.compile(f"[{COLUMN_DELIMITERS}]")
# Inside the coordinate field, after NFKC folding (which turns '；' and '，' into ';' and ',').
_COORD_SPLIT = re.compile(r"[\s;,、]+")
_YOLO_LINE = re.compile(r"^\s*\d+(\s+[-+0-9.eE]+){4}\s*$")
# A YOLO value this far above 1 is a pixel coordinate written into a normalised format.
_YOLO_MAX_VALUE = 1.5
_UPLOAD_PREFIX = re.compile(r"^[0-9a-fA-F]{8}-")
_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png|bmp|tiff?|webp)([?#].*)?$", re.IGNORECASE)


class LabelError(ValueError):
    """A label file that cannot be trusted; `code` is the report's reason code."""

    def __init__(self, code: str, message: str, line: int = 0):
        super().__init__(message)
        self.code = code
        self.line = line

    def located(self, path: str) -> str:
        where = f"{path}:{self.line}" if self.line else path
        return f"{where}: {self}"


@dataclass(frozen=True)
class RawBox:
    xyxy: tuple[float, float, float, float]
    label: str
    line: int
    filename: str | None = None  # the file name the label line claims to describe


@dataclass(frozen=True)
class Labels:
    format: str
    encoding: str
    frame: Literal["pixel", "unit"]
    boxes: tuple[RawBox, ...]
    image_ref: str | None = None  # Label Studio: the image the task names
    declared_size: tuple[int, int] | None = None  # Label Studio: original width, height
    origin: Literal["annotation", "prediction", "predictions_only"] = "annotation"  # Label Studio


def decode_text(data: bytes) -> tuple[str, str]:
    """Decode label bytes: UTF-8 (with or without BOM), UTF-16 with BOM, else GB18030 (a GBK superset)."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="strict"), "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), "utf-16"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030"), "gb18030"
    except UnicodeDecodeError as exc:
        raise LabelError("undecodable_label", f"neither UTF-8 nor GBK/GB18030 (byte {exc.start})") from None


def _content_lines(text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "//")):
            yield number, stripped


def parse_numbers(field: str, line: int) -> list[float]:
    """Numbers of a coordinate field, whatever mixture of delimiters separates them."""
    tokens = [t for t in _COORD_SPLIT.split(unicodedata.normalize("NFKC", field)) if t]
    if not tokens:
        raise LabelError("no_coordinates", "the coordinate field is empty", line)
    try:
        return [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise LabelError("bad_number", f"{bad!r} in the coordinate field is not a number", line) from None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def cxcywh_to_xyxy(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def parse_semicolon(text: str, coord_format: str = "xyxy") -> list[RawBox]:
    """`filename ; coords ; type` lines; several boxes per coords field, every 4 numbers one box.

    Spreadsheets and labelling tools leave stray delimiters and blanks around columns
    (`；a.jpg；…`, `…；灰渣；`, `a.jpg;;…`): empty columns are skipped. Where a line starts
    (ends) with such a stray delimiter, the first (last) filled column is the filename (type)
    only if it is not a run of numbers, since there it may as well be coordinates."""
    boxes = []
    for number, line in _content_lines(text):
        columns = [c.strip() for c in _COLUMN_SPLIT.split(line)]
        if len(columns) < 3:
            raise LabelError(
                "bad_columns", f"expected 'filename ; coords ; type', found {len(columns) - 1} delimiter(s)", number
            )
        filled = [c for c in columns if c]
        if not filled:
            raise LabelError("bad_columns", "the line holds only delimiters", number)
        filename = filled.pop(0) if columns[0] else None
        label = filled.pop() if filled else ""
        if not label or (not columns[-1] and _is_numbers(label)):
            raise LabelError("missing_type", "the defect type column is empty", number)
        if filename is None and filled and not _is_numbers(filled[0]):
            filename = filled.pop(0)
        values = parse_numbers(";".join(filled), number)
        if len(values) % 4:
            raise LabelError(
                "coords_not_multiple_of_4", f"{len(values)} numbers in the coordinate field (4 per box)", number
            )
        for i in range(0, len(values), 4):
            quad = tuple(values[i : i + 4])
            xyxy = cxcywh_to_xyxy(*quad) if coord_format == "cxcywh" else quad
            boxes.append(RawBox(xyxy, label, number, filename))
    return boxes


def _is_numbers(column: str) -> bool:
    tokens = [t for t in _COORD_SPLIT.split(unicodedata.normalize("NFKC", column)) if t]
    return bool(tokens) and all(_is_number(t) for t in tokens)


def parse_yolo(text: str, class_names: list[str] | None) -> list[RawBox]:
    """`class cx cy w h` lines, normalised to the image; class names by index."""
    boxes = []
    for number, line in _content_lines(text):
        parts = line.split()
        if len(parts) != 5:
            raise LabelError("bad_columns", f"expected 'class cx cy w h', found {len(parts)} fields", number)
        try:
            index = int(parts[0])
            cx, cy, w, h = (float(p) for p in parts[1:])
        except ValueError:
            raise LabelError("bad_number", f"not numbers: {line!r}", number) from None
        if not class_names:
            raise LabelError("no_class_names", "YOLO labels need a classes.txt or data.yaml with names", number)
        if not 0 <= index < len(class_names):
            raise LabelError("bad_class_index", f"class {index} not in 0..{len(class_names) - 1}", number)
        if max(abs(cx), abs(cy), abs(w), abs(h)) > _YOLO_MAX_VALUE:
            raise LabelError("not_normalised", "YOLO values must be fractions of the image size", number)
        boxes.append(RawBox(cxcywh_to_xyxy(cx, cy, w, h), class_names[index], number))
    return boxes


def parse_class_names(text: str, is_yaml: bool) -> list[str]:
    """Class names from classes.txt (one per line) or a YOLO data.yaml (`names:` list or mapping)."""
    if not is_yaml:
        return [line.strip() for line in text.splitlines() if line.strip()]
    import yaml

    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise LabelError("no_class_names", f"not valid YAML: {exc}", mark.line + 1 if mark else 0) from None
    names = loaded.get("names") if isinstance(loaded, dict) else None
    if isinstance(names, dict):
        try:
            by_number = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            by_number = {}
        if sorted(by_number) != list(range(len(names))):
            raise LabelError("no_class_names", "data.yaml 'names' mapping needs the keys 0..n-1 (class numbers)")
        return [by_number[k] for k in range(len(names))]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise LabelError("no_class_names", "data.yaml has no 'names' list or mapping")


def parse_labelstudio(text: str, use_predictions: bool = False) -> list[Labels]:
    """A Label Studio JSON export, full (`data`, `annotations`, `predictions`) or JSON-MIN (the
    task's data fields and each control's results at the top level): one `Labels` per task,
    rectangles in percent of the original size. A task with model predictions but no human
    annotation gives no boxes and `origin="predictions_only"`, unless `use_predictions`."""
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelError("bad_json", f"not valid JSON: {exc.msg}", exc.lineno) from None
    if not isinstance(tasks, list):
        raise LabelError("bad_json", "a Label Studio export is a JSON list of tasks")
    result = []
    for task_number, task in enumerate(tasks, start=1):
        if not isinstance(task, dict):
            raise LabelError("bad_task", f"task #{task_number} is not a JSON object")
        if "data" in task:
            image, items, origin = _full_task(task, use_predictions)
        else:
            image, items, origin = _min_task(task)
        if not image:
            raise LabelError(
                "bad_task", f"task #{task_number} names no image (full export: data.image; JSON-MIN: an image field)"
            )
        boxes, size = [], None
        for value in items:
            if value.get("rotation", 0):
                raise LabelError("rotated_box", f"task #{task_number}: rotated rectangles are not supported")
            try:
                x, y, w, h = (float(value[k]) / 100 for k in ("x", "y", "width", "height"))
            except (KeyError, TypeError, ValueError):
                raise LabelError("bad_task", f"task #{task_number}: a rectangle lacks x, y, width or height") from None
            for label in value.get("rectanglelabels", []):
                boxes.append(RawBox((x, y, x + w, y + h), str(label).strip(), task_number))
            if "original_width" in value:
                size = (int(value["original_width"]), int(value["original_height"]))
        result.append(Labels("labelstudio", "utf-8", "unit", tuple(boxes), image_name(image), size, origin))
    return result


def _full_task(task: dict, use_predictions: bool) -> tuple[str | None, list[dict], str]:
    data = task.get("data")
    image = data.get("image") if isinstance(data, dict) else None
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict) and p.get("result")]
    if annotations:
        results, origin = annotations[-1].get("result") or [], "annotation"
    elif predictions and use_predictions:
        results, origin = predictions[-1]["result"], "prediction"
    elif predictions:
        results, origin = [], "predictions_only"
    else:
        results, origin = [], "annotation"
    items = []
    for item in results:
        if isinstance(item, dict) and item.get("type") == "rectanglelabels":
            value = dict(item.get("value") or {})
            value.update({k: item[k] for k in ("original_width", "original_height") if k in item})
            items.append(value)
    return image, items, origin


def _min_task(task: dict) -> tuple[str | None, list[dict], str]:
    image = task.get("image")
    if not isinstance(image, str):
        image = next((v for v in task.values() if isinstance(v, str) and _IMAGE_SUFFIX.search(v)), None)
    items = [
        item
        for value in task.values()
        if isinstance(value, list)
        for item in value
        if isinstance(item, dict) and "rectanglelabels" in item
    ]
    return image, items, "annotation"


def strip_upload_prefix(name: str) -> str:
    """A file name without Label Studio's upload prefix (8 hex digits and a dash)."""
    return _UPLOAD_PREFIX.sub("", name, count=1)


def image_name(reference: str) -> str:
    """The file name inside a label's filename column or a Label Studio image URL."""
    reference = reference.split("?d=")[-1].split("?")[0] if "?" in reference else reference
    return PureWindowsPath(reference).name if "\\" in reference else PurePosixPath(reference).name


def escapes_root(reference: str) -> bool:
    """A filename field that climbs out of the labelled folder (`../`)."""
    parts = re.split(r"[\\/]", reference)
    return ".." in parts


def detect_format(text: str) -> str:
    """Guess a .txt label file's format from its first content line."""
    for number, line in _content_lines(text):
        if any(ch in line for ch in COLUMN_DELIMITERS):
            return "semicolon"
        if _YOLO_LINE.match(line):
            return "yolo"
        raise LabelError("unknown_format", "neither 'name ; coords ; type' nor YOLO 'class cx cy w h'", number)
    return "empty"


def parse_label_text(
    data: bytes,
    fmt: str,
    coord_format: str = "xyxy",
    class_names: Callable[[], list[str] | None] = lambda: None,
) -> Labels:
    """Parse one per-image label file (.txt) in `fmt` ('auto' decides from the content).
    `class_names` is called only for YOLO files, so its lookup costs nothing for the others."""
    text, encoding = decode_text(data)
    if fmt == "auto":
        fmt = detect_format(text)
    if fmt == "empty":
        return Labels("empty", encoding, "pixel", ())
    if fmt == "semicolon":
        return Labels(fmt, encoding, "pixel", tuple(parse_semicolon(text, coord_format)))
    if fmt == "yolo":
        return Labels(fmt, encoding, "unit", tuple(parse_yolo(text, class_names())))
    raise LabelError("unknown_format", f"format {fmt!r} is not a per-image text format")

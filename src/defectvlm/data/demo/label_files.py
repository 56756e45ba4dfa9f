"""Files as factories write them: JPEGs (some EXIF-rotated) and messy label files in three formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from defectvlm.data.demo.items import ABNORMAL, DEFECT_CLASSES, Box, ItemJob, Stream
from defectvlm.io import write_bytes_atomic

_YOLO_CLASS_ORDER = tuple(sorted(DEFECT_CLASSES))
_JPEG_QUALITY = 90
_EXIF_ORIENTATION_TAG = 0x0112
# How the upright image is stored so that a viewer applying the tag shows it upright again
# (PIL's ROTATE_90 turns counter-clockwise; tag 6 asks the viewer to turn clockwise).
_STORED_TRANSPOSE_FOR_ORIENTATION = {
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
    3: Image.Transpose.ROTATE_180,
}
_LABELSTUDIO_FILE = "labelstudio_export.json"
_YOLO_CLASSES_FILE = "classes.txt"


def encode_jpeg(upright: Image.Image, orientation: int) -> bytes:
    buffer = io.BytesIO()
    if orientation == 1:
        upright.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    else:
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION_TAG] = orientation
        stored = upright.transpose(_STORED_TRANSPOSE_FOR_ORIENTATION[orientation])
        stored.save(buffer, "JPEG", quality=_JPEG_QUALITY, exif=exif.tobytes())
    return buffer.getvalue()


def per_image_label(job: ItemJob, boxes: list[Box], width: int, height: int) -> bytes | None:
    if not job.kind.has_defects or job.label_format == "labelstudio":
        return None
    rng = job.rng(Stream.LABEL)
    if job.label_format == "yolo":
        return _yolo_label(rng, boxes, width, height)
    return _semicolon_label(rng, job, boxes)


def _yolo_label(rng: np.random.Generator, boxes: list[Box], width: int, height: int) -> bytes:
    lines = []
    for box in boxes:
        cx = (box.x1 + box.x2) / 2 / width
        cy = (box.y1 + box.y2) / 2 / height
        w = (box.x2 - box.x1) / width
        h = (box.y2 - box.y1) / height
        lines.append(f"{_YOLO_CLASS_ORDER.index(box.cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    newline = "\r\n" if rng.random() < 0.5 else "\n"
    return (newline.join(lines) + newline).encode("utf-8")


_WINDOWS_PREFIXES = (
    "D:\\scan\\{batch}\\",
    "C:\\Users\\qc\\Desktop\\{batch}\\",
    "E:\\AM检测\\{batch}\\",
)
_COMMENTS = ("# 文件名 ; 坐标 ; 缺陷类型", "# 标注: 质检组", "# checked", "# x1,y1,x2,y2")
_FULLWIDTH_SEMICOLON = "\uff1b"
_FULLWIDTH_COMMA = "\uff0c"
_COORD_SEPARATORS = (",", _FULLWIDTH_COMMA, " ", ", ", _FULLWIDTH_SEMICOLON, ";")
_MERGED_COORD_SEPARATORS = (_FULLWIDTH_SEMICOLON, ";", _FULLWIDTH_COMMA, ",", " ")


def _semicolon_label(rng: np.random.Generator, job: ItemJob, boxes: list[Box]) -> bytes:
    """Hand-made-looking `filename ; coords ; 缺陷` lines with per-file quirks."""
    filename = f"{job.name}.jpg"
    if rng.random() < 0.15:
        filename = str(rng.choice(_WINDOWS_PREFIXES)).format(batch=job.batch) + filename
    delimiter_style = str(rng.choice(["ascii", "fullwidth", "mixed"]))
    padding_style = str(rng.choice(["none", "single", "random"]))
    coord_separator = str(rng.choice(_COORD_SEPARATORS))

    def delimiter() -> str:
        if delimiter_style == "mixed":
            mark = _FULLWIDTH_SEMICOLON if rng.random() < 0.5 else ";"
        else:
            mark = _FULLWIDTH_SEMICOLON if delimiter_style == "fullwidth" else ";"
        if padding_style == "single":
            return f" {mark} "
        if padding_style == "random":
            return " " * int(rng.integers(0, 3)) + mark + " " * int(rng.integers(0, 3))
        return mark

    lines = []
    for cls, coords in _coordinate_fields(rng, boxes, coord_separator):
        lines.append(f"{filename}{delimiter()}{coords}{delimiter()}{DEFECT_CLASSES[cls]}")
    if rng.random() < 0.25:
        lines.insert(0, str(rng.choice(_COMMENTS)))
    if rng.random() < 0.2:
        lines.insert(int(rng.integers(0, len(lines) + 1)), "")

    newline = "\r\n" if rng.random() < 0.5 else "\n"
    text = newline.join(lines) + (newline if rng.random() < 0.7 else "")
    encoding_draw = rng.random()
    if encoding_draw < 0.2:
        return text.encode("gbk")
    if encoding_draw < 0.3:
        return text.encode("utf-8-sig")
    return text.encode("utf-8")


def _coordinate_fields(rng: np.random.Generator, boxes: list[Box], coord_separator: str) -> list[tuple[str, str]]:
    """One (class, coords) pair per line; same-class boxes are sometimes merged into one line."""
    if rng.random() < 0.4:
        by_class: dict[str, list[Box]] = {}
        for box in boxes:
            by_class.setdefault(box.cls, []).append(box)
        return [(cls, _merged_coordinates(rng, group)) for cls, group in by_class.items()]
    return [(box.cls, coord_separator.join(str(v) for v in (box.x1, box.y1, box.x2, box.y2))) for box in boxes]


def _merged_coordinates(rng: np.random.Generator, boxes: list[Box]) -> str:
    parts = []
    for box in boxes:
        numbers = [str(v) for v in (box.x1, box.y1, box.x2, box.y2)]
        separators = [str(rng.choice(_MERGED_COORD_SEPARATORS)) for _ in range(3)]
        parts.append("".join(n + s for n, s in zip(numbers, [*separators, ""], strict=True)))
    return "  ".join(parts)


def write_dataset_level_labels(out: Path, records: list[dict], label_format: str) -> int:
    if label_format == "yolo":
        classes = "".join(f"{DEFECT_CLASSES[cls]}\n" for cls in _YOLO_CLASS_ORDER)
        write_bytes_atomic(out / ABNORMAL.root / _YOLO_CLASSES_FILE, classes.encode("utf-8"))
        return 1
    if label_format == "labelstudio":
        abnormal = [record for record in records if record["label"] == ABNORMAL.label]
        tasks = [_labelstudio_task(i, record) for i, record in enumerate(abnormal, start=1)]
        write_bytes_atomic(out / ABNORMAL.root / _LABELSTUDIO_FILE, json_bytes(tasks))
        return 1
    return 0


def _labelstudio_task(task_id: int, record: dict) -> dict:
    width, height = record["width"], record["height"]
    results = []
    for k, box in enumerate(record["boxes"]):
        x1, y1, x2, y2 = box["xyxy"]
        value = {
            "x": x1 / width * 100,
            "y": y1 / height * 100,
            "width": (x2 - x1) / width * 100,
            "height": (y2 - y1) / height * 100,
            "rotation": 0,
            "rectanglelabels": [box["raw"]],
        }
        results.append(
            {
                "id": f"r{k}",
                "type": "rectanglelabels",
                "from_name": "label",
                "to_name": "image",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": value,
            }
        )
    return {
        "id": task_id,
        "data": {"image": f"/data/local-files/?d={record['path']}"},
        "annotations": [{"id": task_id, "result": results}],
    }


def truth_jsonl(records: list[dict]) -> bytes:
    lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return "".join(lines).encode("utf-8")


def json_bytes(payload: object) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, indent=2) + "\n").encode("utf-8")

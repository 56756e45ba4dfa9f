"""The split as an Ultralytics dataset: `images/<split>/…`, `labels/<split>/….txt`, `data.yaml`.

The same train/val/test as the VLM (a detector trained on it never sees the VLM's test
images), the label boxes (the regions step's positives) in the upright frame, class numbers
in our class order. Images keep their bytes when they need no rotation; EXIF-rotated ones are
written upright as PNG. Paths mirror the image ids, so names never collide. Normal images get
an empty label file (Ultralytics backgrounds).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from defectvlm.data.images import load_upright, png_bytes, probe_bytes
from defectvlm.errors import StepFailure
from defectvlm.io import write_bytes_atomic

YOLO_DIGITS = 8  # fractions of the image: 1e-8 of a 10k-pixel side is far below the 0.01 px ingest keeps


def yolo_line(class_number: int, xyxy: list[float], width: int, height: int) -> str:
    x1, y1, x2, y2 = xyxy
    values = ((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)
    return " ".join([str(class_number), *(f"{v:.{YOLO_DIGITS}f}" for v in values)])


def upright_file(path: str, size: tuple[int, int]) -> tuple[bytes, str]:
    """The image's bytes and suffix as a detector must read them: unchanged, or upright PNG."""
    data = Path(path).read_bytes()
    probe = probe_bytes(data)
    if probe.error or probe.display_size != tuple(size):
        raise StepFailure(f"{path}: not the {size[0]}x{size[1]} image recorded at ingest; re-run ingest")
    if probe.orientation == 1:
        return data, posixpath.splitext(path)[1].lower()
    return png_bytes(load_upright(path)), ".png"


def export_yolo(regions: dict[str, list[dict]], classes: list[str], folder: Path) -> dict:
    """Write the Ultralytics dataset into `folder`; returns its summary."""
    number = {cls: i for i, cls in enumerate(classes)}
    counts = {}
    for split, rows in regions.items():
        boxes = 0
        for image in rows:
            data, suffix = upright_file(image["path"], (image["width"], image["height"]))
            stem = posixpath.splitext(image["id"])[0]
            write_bytes_atomic(folder / "images" / split / f"{stem}{suffix}", data)
            lines = [
                yolo_line(number[r["cls"]], r["xyxy"], image["width"], image["height"])
                for r in image["regions"]
                if r["source"] == "positive"
            ]
            boxes += len(lines)
            write_bytes_atomic(folder / "labels" / split / f"{stem}.txt", "".join(f"{x}\n" for x in lines).encode())
        counts[split] = {"images": len(rows), "boxes": boxes}
    data_yaml = "".join(f"{split}: images/{split}\n" for split in regions) + "names:\n"
    data_yaml += "".join(f"  {i}: {_yaml_text(cls)}\n" for i, cls in enumerate(classes))
    write_bytes_atomic(folder / "data.yaml", data_yaml.encode("utf-8"))
    data_path = f"{'' if folder.is_absolute() else '$(pwd)/'}{folder}/data.yaml"
    return {
        "format": "yolo",
        "folder": str(folder),
        "classes": classes,
        "splits": counts,
        # Ultralytics resolves a relative dataset path under its own datasets folder: pass an absolute one.
        "command": f"yolo detect train data={data_path} model=yolo11n.pt",
    }


def _yaml_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar

"""Which images to predict and which candidate regions to judge on each.

Images: a folder (searched recursively), a glob, or a manifest (`manifest.jsonl` with a
`path` per line, or a text file with one path per line). Regions, in pixels of the upright
image: a boxes JSONL (`{"image", "boxes": [{"xyxy", "score"?, "cls"?}]}`), a folder of
YOLO prediction files (`<image stem>.txt`, lines `cls cx cy w h [conf]`), or a Label Studio
JSON export. With none, `grid_windows` covers the image with windows the size of the
median training defect. Bad input names its file and line.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path

from defectvlm.config import ConfigError, IngestParams, Params
from defectvlm.data.labels import LabelError, cxcywh_to_xyxy, image_name, parse_labelstudio
from defectvlm.errors import StepFailure

IMAGE_EXTENSIONS = tuple(IngestParams().image_extensions)
PROPOSAL_SOURCES = ("detector",)


@dataclass(frozen=True)
class Region:
    xyxy: tuple[float, float, float, float]  # pixels, or fractions of the image when unit
    where: str  # file:line it came from (or "grid")
    score: float | None = None
    cls: str | None = None
    unit: bool = False

    def in_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.xyxy
        if self.unit:
            x1, y1, x2, y2 = x1 * width, y1 * height, x2 * width, y2 * height
        if x1 < -0.5 or y1 < -0.5 or x2 > width + 0.5 or y2 > height + 0.5:
            raise StepFailure(
                f"{self.where}: box {[round(v, 1) for v in (x1, y1, x2, y2)]} is outside the {width}x{height} image"
            )
        return (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))


def find_images(spec: str) -> list[Path]:
    """The images named by a folder, a glob or a manifest, sorted, without duplicates."""
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    elif path.is_file():
        found = _manifest(path)
    elif any(ch in spec for ch in "*?["):
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    else:
        raise StepFailure(f"--images {spec}: no such folder, manifest or glob match")
    if not found:
        raise StepFailure(f"--images {spec}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(set(found))


def _manifest(path: Path) -> list[Path]:
    paths = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StepFailure(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                raise StepFailure(f'{path}:{number}: a manifest line needs a "path"')
            line = record["path"]
        candidate = Path(line.strip())
        paths.append(candidate if candidate.exists() or candidate.is_absolute() else path.parent / candidate)
    return paths


class RegionSource:
    """Regions per image reference; `regions_for(image)` finds an image's by path or file name."""

    def __init__(self, by_reference: dict[str, list[Region]], base: Path):
        self.by_path = {(base / ref).resolve(): regions for ref, regions in by_reference.items()}
        self.by_path.update({Path(ref).resolve(): regions for ref, regions in by_reference.items()})
        self.by_name: dict[str, list[Region]] = {}
        for ref, regions in by_reference.items():
            self.by_name.setdefault(image_name(ref), regions)

    def regions_for(self, image: Path) -> list[Region]:
        resolved = image.resolve()
        if resolved in self.by_path:
            return self.by_path[resolved]
        return self.by_name.get(image.name, self.by_name.get(image.stem, []))


def region_source(
    regions: str | None,
    proposals: str | None,
    detector: str | None = None,
    params: Params | None = None,
) -> RegionSource | DetectorSource | None:
    """The source named by --regions or --proposals (None: the default grid). `--proposals detector`
    runs `detector` (a registry URI, a train-detector folder or an ONNX file; default: the
    registered `<registry.model_name>-detector@candidate`) with the settings of `params`."""
    if detector and proposals != "detector":
        raise ConfigError("--detector goes with --proposals detector")
    if proposals:
        if proposals != "detector":
            raise ConfigError(f"--proposals {proposals}: unknown source (known: {', '.join(PROPOSAL_SOURCES)})")
        from defectvlm.detector.loading import open_detector

        return DetectorSource(open_detector(detector, params or Params()))
    if not regions:
        return None
    path = Path(regions)
    if path.is_dir():
        return RegionSource(_yolo_folder(path), path)
    if not path.is_file():
        raise StepFailure(f"--regions {regions}: no such file or folder")
    if path.suffix == ".jsonl":
        return RegionSource(_boxes_jsonl(path), path.parent)
    if path.suffix == ".json":
        return RegionSource(_labelstudio(path), path.parent)
    raise ConfigError(f"--regions {regions}: expected a .jsonl boxes file, a Label Studio .json or a YOLO folder")


class DetectorSource:
    """Regions proposed by a detector: its boxes at or above its confidence, best first, at most
    its budget (regions.max_boxes_per_image), each with the detector's score and class."""

    def __init__(self, detector):
        self.detector = detector

    def regions_for(self, image: Path) -> list[Region]:
        from defectvlm.data.images import load_upright

        return [
            Region(found.xyxy, f"detector {self.detector.name}", found.score, found.cls)
            for found in self.detector.propose(load_upright(str(image)))
        ]


def _boxes_jsonl(path: Path) -> dict[str, list[Region]]:
    found: dict[str, list[Region]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StepFailure(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise StepFailure(f'{where}: expected {{"image": path, "boxes": [...]}}')
        boxes = record.get("boxes")
        if not isinstance(boxes, list):
            raise StepFailure(f'{where}: "boxes" must be a list')
        regions = found.setdefault(record["image"], [])
        for box in boxes:
            xyxy = box.get("xyxy") if isinstance(box, dict) else None
            if not (isinstance(xyxy, list) and len(xyxy) == 4 and all(isinstance(v, (int, float)) for v in xyxy)):
                raise StepFailure(f'{where}: every box needs "xyxy": [x1, y1, x2, y2] in pixels, got {box!r}')
            score, cls = box.get("score"), box.get("cls")
            regions.append(_checked(Region(tuple(float(v) for v in xyxy), where, score, cls)))
    return found


def _yolo_folder(folder: Path) -> dict[str, list[Region]]:
    found = {}
    for path in sorted(folder.glob("*.txt")):
        regions = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            where = f"{path}:{number}"
            if len(parts) not in (5, 6):
                raise StepFailure(f"{where}: expected 'cls cx cy w h [conf]', found {len(parts)} fields")
            try:
                cls = int(parts[0])
                numbers = [float(p) for p in parts[1:]]
            except ValueError:
                raise StepFailure(f"{where}: not numbers: {line!r}") from None
            box = cxcywh_to_xyxy(*numbers[:4])
            regions.append(_checked(Region(box, where, numbers[4] if len(numbers) == 5 else None, str(cls), True)))
        found[path.stem] = regions  # matched to the image of that stem
    return found


def _labelstudio(path: Path) -> dict[str, list[Region]]:
    try:
        tasks = parse_labelstudio(path.read_text(encoding="utf-8"))
    except LabelError as exc:
        raise StepFailure(exc.located(str(path))) from None
    found: dict[str, list[Region]] = {}
    for task in tasks:
        regions = found.setdefault(task.image_ref, [])
        for box in task.boxes:
            regions.append(_checked(Region(box.xyxy, f"{path}: task #{box.line}", None, box.label, True)))
    return found


def _checked(region: Region) -> Region:
    x1, y1, x2, y2 = region.xyxy
    if not all(math.isfinite(v) for v in region.xyxy) or x2 <= x1 or y2 <= y1:
        raise StepFailure(f"{region.where}: box {list(region.xyxy)} is empty or inverted (need x1 < x2, y1 < y2)")
    return region


def grid_windows(width: int, height: int, window: dict) -> list[Region]:
    """Windows the size of the median training defect (`window` from prompt.json), tiling the
    image edge to edge without overlap (the last row and column are shifted inside), row-major."""
    w = max(1.0, min(width, window["width_fraction"] * width))
    h = max(1.0, min(height, window["height_fraction"] * height))
    columns, rows = math.ceil(width / w), math.ceil(height / h)
    xs = [min(i * w, width - w) for i in range(columns)]
    ys = [min(j * h, height - h) for j in range(rows)]
    return [Region((round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)), "grid") for y in ys for x in xs]

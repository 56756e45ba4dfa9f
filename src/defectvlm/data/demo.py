"""Deterministic synthetic powder-bed defect dataset for additive-manufacturing inspection.

`generate_demo` writes a small, realistic-looking stand-in for a factory's image folders:
greyscale-ish powder-bed photos (some stored EXIF-rotated), hand-made-looking label files
in one of three formats, and a machine-readable ground truth (`demo_truth.jsonl`) that the
ingest step is tested against.

Every item draws its randomness from its own generator, keyed by (seed, kind, index, stream),
so the output is byte-identical whatever the processing order or number of workers.
Box coordinates are integer pixel edges in the displayed (EXIF-applied) frame: x2 and y2 are
exclusive, so 0 <= x1 < x2 <= width.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from enum import IntEnum
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from defectvlm.io import write_bytes_atomic

DEFECT_CLASSES: dict[str, str] = {
    "streak": "条纹",
    "slag": "灰渣",
    "over_melt": "过熔",
    "incomplete_spreading": "铺粉不完全",
}
LABEL_FORMATS = ("semicolon", "yolo", "labelstudio")

_CANONICAL_CLASSES = tuple(DEFECT_CLASSES)
_YOLO_CLASS_ORDER = tuple(sorted(DEFECT_CLASSES))
_BATCH_COUNT = 12
_JPEG_QUALITY = 90
_ROTATED_FRACTION = 0.05
_EXIF_ORIENTATION_TAG = 0x0112
# How the upright image is stored so that a viewer applying the tag shows it upright again
# (PIL's ROTATE_90 turns counter-clockwise; tag 6 asks the viewer to turn clockwise).
_STORED_TRANSPOSE_FOR_ORIENTATION = {
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
    3: Image.Transpose.ROTATE_180,
}
_ILLUMINATION_GRID_STEP = 16
_MIN_BOX_GAP = 4
_POWDER_RIDGE_ROWS = 3
_PLACEMENT_ATTEMPTS = 60
_TRUTH_FILE = "demo_truth.jsonl"
_SUMMARY_FILE = "demo_summary.json"
_LABELSTUDIO_FILE = "labelstudio_export.json"
_YOLO_CLASSES_FILE = "classes.txt"

FloatImage = np.ndarray  # float32, shape (height, width), grey levels around 0..255


@dataclass(frozen=True)
class DemoSummary:
    n_abnormal: int
    n_normal: int
    n_boxes: int
    boxes_per_class: dict[str, int]
    label_format: str
    files_written: int


@dataclass(frozen=True)
class _Kind:
    code: int
    root: str
    prefix: str
    label: str
    has_defects: bool


_ABNORMAL = _Kind(code=1, root="abnormal_root", prefix="am", label="abnormal", has_defects=True)
_NORMAL = _Kind(code=2, root="normal_root", prefix="nm", label="normal", has_defects=False)


class _Stream(IntEnum):
    IMAGE = 0
    LABEL = 1


@dataclass(frozen=True)
class _ItemJob:
    out: Path
    seed: int
    kind: _Kind
    index: int
    label_format: str

    @property
    def name(self) -> str:
        return f"{self.kind.prefix}_{self.index:04d}"

    @property
    def batch(self) -> str:
        return f"batch_{self.index % _BATCH_COUNT + 1:02d}"

    @property
    def relative_image_path(self) -> str:
        return f"{self.kind.root}/{self.batch}/{self.name}.jpg"

    def rng(self, stream: _Stream) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.kind.code, self.index, int(stream)])


@dataclass(frozen=True)
class _Box:
    x1: int
    y1: int
    x2: int
    y2: int
    cls: str

    def gap_to(self, other: _Box) -> int:
        """Chebyshev-style gap between boxes; negative when they overlap."""
        dx = max(other.x1 - self.x2, self.x1 - other.x2)
        dy = max(other.y1 - self.y2, self.y1 - other.y2)
        return max(dx, dy)


@dataclass(frozen=True)
class _Stamp:
    """A defect of known size, painted in place onto the albedo region under its box."""

    cls: str
    width: int
    height: int
    paint: Callable[[FloatImage, np.random.Generator], None]


@dataclass(frozen=True)
class _RenderedItem:
    upright: Image.Image  # RGB, in the displayed frame
    boxes: list[_Box]
    orientation: int


@dataclass(frozen=True)
class _ItemResult:
    record: dict
    files_written: int


def generate_demo(
    out: Path,
    *,
    seed: int = 0,
    n_abnormal: int = 120,
    n_normal: int = 120,
    label_format: str = "semicolon",
    workers: int = 1,
) -> DemoSummary:
    """Write the synthetic dataset under `out` and return its summary.

    A previous demo under `out` (recognised by its summary file) is removed first, so no stale
    file survives; a folder holding other image roots is refused rather than mixed into.
    `workers > 1` renders in spawned processes, so a calling script needs the usual
    `if __name__ == "__main__":` guard.
    """
    _validate_arguments(seed, n_abnormal, n_normal, label_format, workers)
    out = Path(out)
    _clear_previous_demo(out)
    jobs = _item_jobs(out, seed, n_abnormal, n_normal, label_format)
    results = _run_jobs(jobs, workers)
    records = sorted((result.record for result in results), key=lambda record: record["path"])
    files_written = sum(result.files_written for result in results)

    write_bytes_atomic(out / _TRUTH_FILE, _truth_jsonl(records))
    files_written += 1
    files_written += _write_dataset_level_labels(out, records, label_format)

    boxes_per_class = Counter(box["cls"] for record in records for box in record["boxes"])
    summary = DemoSummary(
        n_abnormal=n_abnormal,
        n_normal=n_normal,
        n_boxes=sum(boxes_per_class.values()),
        boxes_per_class={cls: boxes_per_class[cls] for cls in _CANONICAL_CLASSES},
        label_format=label_format,
        files_written=files_written + 1,  # counts the summary file itself
    )
    write_bytes_atomic(out / _SUMMARY_FILE, _json_bytes(asdict(summary)))
    return summary


def _clear_previous_demo(out: Path) -> None:
    roots = [out / _ABNORMAL.root, out / _NORMAL.root]
    if (out / _SUMMARY_FILE).exists():
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
        for name in (_TRUTH_FILE, _SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
    elif any(root.exists() for root in roots):
        raise ValueError(f"{out} already holds image folders that are not a demo dataset; choose another --out")


def _validate_arguments(seed: int, n_abnormal: int, n_normal: int, label_format: str, workers: int) -> None:
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if n_abnormal < 0 or n_normal < 0:
        raise ValueError("n_abnormal and n_normal must be >= 0")
    if workers < 1:
        raise ValueError("workers must be >= 1")


def _item_jobs(out: Path, seed: int, n_abnormal: int, n_normal: int, label_format: str) -> list[_ItemJob]:
    abnormal = [_ItemJob(out, seed, _ABNORMAL, i, label_format) for i in range(n_abnormal)]
    normal = [_ItemJob(out, seed, _NORMAL, i, label_format) for i in range(n_normal)]
    return abnormal + normal


def _run_jobs(jobs: Sequence[_ItemJob], workers: int) -> list[_ItemResult]:
    if workers == 1 or len(jobs) <= 1:
        return [_produce_item(job) for job in jobs]
    # "spawn" because callers (CLI, tests) may already hold torch/BLAS threads, which fork
    # can deadlock on. ProcessPoolExecutor rather than Pool: a worker that dies (e.g. a script
    # without a `__main__` guard) raises BrokenProcessPool instead of hanging forever.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
        chunksize = max(1, len(jobs) // (workers * 4))
        return list(executor.map(_produce_item, jobs, chunksize=chunksize))


def _produce_item(job: _ItemJob) -> _ItemResult:
    item = _render_item(job)
    width, height = item.upright.size
    image_path = job.out / job.relative_image_path
    write_bytes_atomic(image_path, _encode_jpeg(item.upright, item.orientation))
    files_written = 1

    label_text = _per_image_label(job, item.boxes, width, height)
    if label_text is not None:
        write_bytes_atomic(image_path.with_suffix(".txt"), label_text)
        files_written += 1

    record = {
        "path": job.relative_image_path,
        "label": job.kind.label,
        "width": width,
        "height": height,
        "orientation": item.orientation,
        "boxes": [{"xyxy": [b.x1, b.y1, b.x2, b.y2], "cls": b.cls, "raw": DEFECT_CLASSES[b.cls]} for b in item.boxes],
    }
    return _ItemResult(record=record, files_written=files_written)


# --------------------------------------------------------------------------- rendering


def _render_item(job: _ItemJob) -> _RenderedItem:
    rng = job.rng(_Stream.IMAGE)
    width = 8 * int(rng.integers(80, 201))
    height = 8 * int(rng.integers(75, 151))
    orientation = int(rng.choice([6, 8, 3])) if rng.random() < _ROTATED_FRACTION else 1

    albedo = _powder_albedo(rng, height, width)
    boxes: list[_Box] = []
    if job.kind.has_defects:
        boxes = _paint_defects(rng, albedo, _defect_classes(rng, cycle_position=job.seed + job.index))
    shaded = albedo * _illumination(rng, height, width)
    return _RenderedItem(_tinted_rgb(rng, shaded), boxes, orientation)


def _upsample(coarse: np.ndarray, height: int, width: int) -> FloatImage:
    resized = Image.fromarray(coarse.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32)


def _powder_albedo(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    """Granular grey powder with faint horizontal recoater marks, before lighting."""
    # Uniform noise is much cheaper to draw than Gaussian and reads the same as powder grain.
    fine = rng.random((height, width), dtype=np.float32)
    fine -= 0.5
    fine *= np.float32(math.sqrt(12.0))  # unit variance
    clumps = _box_blur_3x3(fine)
    clumps *= 3.0  # unit variance again
    albedo = rng.uniform(7.0, 12.0) * fine
    albedo += rng.uniform(4.0, 8.0) * clumps
    # The noise's top 0.5% doubles as sparse bright particles.
    albedo += np.float32(30.0) * (fine > np.float32(0.99 * math.sqrt(3.0)))
    albedo += np.float32(rng.uniform(105.0, 165.0))
    albedo += _recoater_profile(rng, height)[:, None]
    return albedo


def _box_blur_3x3(image: FloatImage) -> FloatImage:
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    blurred = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    blurred /= 9.0
    return blurred


def _recoater_profile(rng: np.random.Generator, height: int) -> np.ndarray:
    profile = rng.normal(0.0, 0.8, height).astype(np.float32)
    for _ in range(int(rng.integers(2, 9))):
        row = int(rng.integers(0, height - 2))
        thickness = int(rng.integers(1, 3))
        profile[row : row + thickness] += rng.uniform(-6.0, 6.0)
    return profile


def _illumination(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    """Multiplicative lighting: gradient, broad blotches, an optional soft shadow, vignetting.

    Applied to normal and abnormal images alike so that overall darkness or brightness is
    no shortcut for spotting a defect. The field is smooth, so it is computed on a coarse
    grid and upsampled.
    """
    coarse = _coarse_illumination(rng, height // _ILLUMINATION_GRID_STEP + 2, width // _ILLUMINATION_GRID_STEP + 2)
    return _upsample(coarse, height, width)


def _coarse_illumination(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    light = 1.0 + rng.uniform(0.03, 0.12) * (x * math.cos(angle) + y * math.sin(angle))
    light = light + rng.uniform(0.02, 0.07) * _upsample(rng.standard_normal((4, 5)), height, width)
    light *= 1.0 - rng.uniform(0.08, 0.25) * (x * x + y * y) / 2.0
    if rng.random() < 0.5:
        light *= _soft_shadow(rng, x, y)
    return light.astype(np.float32)


def _soft_shadow(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    side = int(rng.integers(4))
    coordinate = (x, -x, y, -y)[side]
    edge_softness = rng.uniform(0.05, 0.2)
    start = rng.uniform(0.5, 0.9)
    darkness = rng.uniform(0.08, 0.25)
    return 1.0 - darkness / (1.0 + np.exp(-(coordinate - start) / edge_softness))


def _tinted_rgb(rng: np.random.Generator, shaded: FloatImage) -> Image.Image:
    """Slightly warm or cool grey, as cameras under chamber lighting record it."""
    grey = Image.fromarray(np.clip(shaded, 0.0, 255.0).astype(np.uint8))
    warmth = rng.uniform(-0.04, 0.06)
    red = grey.point(_scaling_table(1.0 + warmth))
    blue = grey.point(_scaling_table(1.0 - warmth))
    return Image.merge("RGB", (red, grey, blue))


def _scaling_table(factor: float) -> list[int]:
    return [min(255, round(level * factor)) for level in range(256)]


# --------------------------------------------------------------------------- defects


def _defect_classes(rng: np.random.Generator, *, cycle_position: int) -> list[str]:
    """1-4 classes; the first cycles through all classes so the dataset stays balanced."""
    count = int(rng.integers(1, 5))
    first = _CANONICAL_CLASSES[cycle_position % len(_CANONICAL_CLASSES)]
    rest = rng.integers(len(_CANONICAL_CLASSES), size=count - 1)
    return [first, *(_CANONICAL_CLASSES[int(i)] for i in rest)]


def _paint_defects(rng: np.random.Generator, albedo: FloatImage, classes: list[str]) -> list[_Box]:
    height, width = albedo.shape
    stamps = [_STAMP_SAMPLERS[cls](rng) for cls in classes]
    boxes: list[_Box] = []
    for stamp in stamps:
        box = _place(rng, stamp, boxes, width, height)
        if box is None:
            continue
        stamp.paint(albedo[box.y1 : box.y2, box.x1 : box.x2], rng)
        boxes.append(box)
    return boxes


def _place(rng: np.random.Generator, stamp: _Stamp, placed: list[_Box], width: int, height: int) -> _Box | None:
    """Random position inside the image, kept apart from earlier boxes (so IoU is 0)."""
    for _ in range(_PLACEMENT_ATTEMPTS):
        x1 = int(rng.integers(0, width - stamp.width + 1))
        y1 = int(rng.integers(0, height - stamp.height + 1))
        box = _Box(x1, y1, x1 + stamp.width, y1 + stamp.height, stamp.cls)
        if all(box.gap_to(other) >= _MIN_BOX_GAP for other in placed):
            return box
    return None


def _local_grid(region: FloatImage) -> tuple[np.ndarray, np.ndarray]:
    height, width = region.shape
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    return y, x


def _smooth_1d(rng: np.random.Generator, length: int, knots: int) -> np.ndarray:
    """Smooth random curve, roughly in [0, 1], through `knots` random values."""
    return _upsample(rng.random((1, knots)), 1, length)[0]


def _streak_stamp(rng: np.random.Generator) -> _Stamp:
    """Thin long line(s) along the recoater direction, darker or brighter than the bed."""
    length = int(rng.integers(120, 601))
    thickness = float(rng.uniform(2.0, 6.0))
    drift = float(rng.uniform(-1.0, 1.0) * min(0.02 * length, 8.0))
    line_gaps = [0.0] if rng.random() < 0.7 else [0.0, float(rng.uniform(thickness + 3, 14.0))]
    margin = 3
    first_centre = margin + thickness / 2 + max(-drift, 0.0)
    centres = tuple((first_centre + gap, first_centre + gap + drift) for gap in line_gaps)
    height = math.ceil(abs(drift) + line_gaps[-1] + thickness) + 2 * margin
    contrast = float(rng.uniform(65.0, 100.0)) * (-1.0 if rng.random() < 0.6 else 1.0)
    paint = partial(
        _paint_streak,
        centres=centres,
        thickness=thickness,
        start=margin,
        length=length,
        contrast=contrast,
    )
    return _Stamp("streak", length + 2 * margin, height, paint)


def _paint_streak(
    region: FloatImage,
    rng: np.random.Generator,
    *,
    centres: tuple[tuple[float, float], ...],
    thickness: float,
    start: int,
    length: int,
    contrast: float,
) -> None:
    y, x = _local_grid(region)
    progress = np.clip((x - start) / length, 0.0, 1.0)
    # Lines fade in/out at their ends and vary in strength along their length.
    end_fade = np.clip(np.minimum(x - start, start + length - x) / 10.0, 0.0, 1.0)
    strength = end_fade * (0.75 + 0.25 * _smooth_1d(rng, region.shape[1], 6))[None, :]
    for begin, finish in centres:
        centre = begin + (finish - begin) * progress
        coverage = np.clip(thickness / 2 + 0.5 - np.abs(y - centre), 0.0, 1.0)
        region += contrast * coverage * strength


def _slag_stamp(rng: np.random.Generator) -> _Stamp:
    """A cluster of dark spatter spots."""
    count = int(rng.integers(4, 13))
    spread = float(rng.uniform(6.0, 20.0))
    centres = np.clip(rng.normal(0.0, spread / 2, (count, 2)), -spread, spread)
    radii = rng.uniform(1.8, 4.0, count)
    radii[0] = rng.uniform(3.5, 6.0)  # one main droplet makes the cluster readable when downscaled
    margin = 2
    low = (centres - radii[:, None]).min(axis=0)
    high = (centres + radii[:, None]).max(axis=0)
    size = np.clip(np.ceil(high - low) + 2 * margin, 15, 60).astype(int)
    # Centre the cluster in its (possibly padded) box.
    offsets = (size - (high - low)) / 2 - low
    spots = tuple(
        (float(cy + offsets[0]), float(cx + offsets[1]), float(r)) for (cy, cx), r in zip(centres, radii, strict=True)
    )
    return _Stamp("slag", int(size[1]), int(size[0]), partial(_paint_slag, spots=spots))


def _paint_slag(region: FloatImage, rng: np.random.Generator, *, spots: tuple[tuple[float, float, float], ...]) -> None:
    y, x = _local_grid(region)
    for cy, cx, radius in spots:
        # Irregular droplets rather than perfect discs: the radius wobbles with the angle.
        lobes = int(rng.integers(2, 5))
        wobble = 1.0 + rng.uniform(0.1, 0.3) * np.cos(lobes * np.arctan2(y - cy, x - cx) + rng.uniform(0, 2 * math.pi))
        distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) * wobble
        halo = np.clip(1.0 - (distance - radius) / (radius + 1.0), 0.0, 1.0)
        region -= 18.0 * halo
        core = np.clip(radius + 0.5 - distance, 0.0, 1.0)
        region += (rng.uniform(20.0, 55.0) - region) * core
        if radius > 3.0:  # larger droplets catch a small specular glint
            glint_distance = np.sqrt((y - cy + 0.35 * radius) ** 2 + (x - cx + 0.35 * radius) ** 2)
            glint = np.clip(0.3 * radius + 0.5 - glint_distance, 0.0, 1.0)
            region += (rng.uniform(170.0, 220.0) - region) * glint


def _over_melt_stamp(rng: np.random.Generator) -> _Stamp:
    """A bright, glossy, rippled patch of re-melted material."""
    width = int(rng.integers(40, 161))
    height = int(np.clip(width * rng.uniform(0.6, 1.4), 40, 160))
    harmonics = tuple((k, float(rng.uniform(0.0, 0.1)), float(rng.uniform(0.0, 2 * math.pi))) for k in (2, 3, 5))
    paint = partial(
        _paint_over_melt,
        harmonics=harmonics,
        ripple_period=float(rng.uniform(4.0, 9.0)),
        ripple_angle=float(rng.uniform(0.0, math.pi)),
        brightness=float(rng.uniform(195.0, 235.0)),
        highlight=(float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))),
    )
    return _Stamp("over_melt", width, height, paint)


def _paint_over_melt(
    region: FloatImage,
    rng: np.random.Generator,
    *,
    harmonics: tuple[tuple[int, float, float], ...],
    ripple_period: float,
    ripple_angle: float,
    brightness: float,
    highlight: tuple[float, float],
) -> None:
    height, width = region.shape
    y, x = _local_grid(region)
    semi_y, semi_x = height / 2 - 2, width / 2 - 2
    dy, dx = (y - height / 2 + 0.5) / semi_y, (x - width / 2 + 0.5) / semi_x
    theta = np.arctan2(dy, dx)
    outline = 1.0 - sum(amp * (1.0 + np.cos(k * theta + phase)) / 2 for k, amp, phase in harmonics)
    rho = np.sqrt(dx * dx + dy * dy) / outline
    edge_pixels = 2.0 / min(semi_x, semi_y)
    inside = np.clip((1.0 - rho) / edge_pixels, 0.0, 1.0)
    dark_rim = np.clip(1.0 - np.abs(rho - 1.05) / 0.08, 0.0, 1.0)

    along = x * math.cos(ripple_angle) + y * math.sin(ripple_angle)
    warp = 1.5 * ripple_period * _upsample(rng.standard_normal((4, 4)), height, width)
    ripple = np.sin(2 * math.pi * (along + 2.0 * rho * ripple_period + warp) / ripple_period)
    surface = rng.standard_normal((height, width), dtype=np.float32)
    glint_y, glint_x = highlight[0] * height, highlight[1] * width
    glint_sigma2 = 2 * (0.15 * min(height, width)) ** 2
    glint = np.exp(-((y - glint_y) ** 2 + (x - glint_x) ** 2) / glint_sigma2)
    gloss = brightness + rng.uniform(12.0, 22.0) * ripple + 35.0 * glint - 25.0 * rho + 5.0 * surface

    region -= 25.0 * dark_rim
    region += (gloss - region) * inside


def _incomplete_spreading_stamp(rng: np.random.Generator) -> _Stamp:
    """A region the recoater left bare: darker, smoother, sharp edge along the recoater."""
    width = int(rng.integers(100, 401))
    height = min(220, int(rng.integers(max(40, int(width * 0.2)), max(61, int(width * 0.55)))))
    paint = partial(
        _paint_incomplete_spreading,
        darkening=float(rng.uniform(35.0, 65.0)),
        hatch_angle=float(rng.choice([math.pi / 4, 3 * math.pi / 4, 0.37 * math.pi])),
        hatch_period=float(rng.uniform(5.0, 8.0)),
    )
    return _Stamp("incomplete_spreading", width, height, paint)


def _paint_incomplete_spreading(
    region: FloatImage,
    rng: np.random.Generator,
    *,
    darkening: float,
    hatch_angle: float,
    hatch_period: float,
) -> None:
    height, width = region.shape
    y, x = _local_grid(region)
    top = _POWDER_RIDGE_ROWS + 1
    depth = height - top - 1
    crumble = _smooth_1d(rng, width, max(4, width // 6)) - 0.5
    bottom = top + depth * (0.55 + 0.35 * _smooth_1d(rng, width, 6))[None, :] + 5.0 * crumble
    left = 0.12 * width * _smooth_1d(rng, height, 5)[:, None]
    right = width - 1 - 0.12 * width * _smooth_1d(rng, height, 5)[:, None]
    # Sharp top edge (the recoater's blade line), ragged soft bottom and ends.
    bare = (
        (y >= top)
        * np.clip((bottom - y) / 4.0, 0.0, 1.0)
        * np.clip((x - left) / 3.0, 0.0, 1.0)
        * np.clip((right - x) / 3.0, 0.0, 1.0)
    )
    # The previous layer's laser hatch shows through where powder is missing.
    hatch = np.sin(2 * math.pi * (x * math.cos(hatch_angle) + y * math.sin(hatch_angle)) / hatch_period)
    mean = float(region.mean())
    mottling = 6.0 * _upsample(rng.standard_normal((4, 6)), height, width)
    substrate = mean - darkening + mottling + 5.0 * hatch + 0.15 * (region - mean)

    # Powder pushed ahead of the blade piles up as a thin bright ridge just above the edge.
    ridge = (y < _POWDER_RIDGE_ROWS) * bare[top : top + 1, :]
    region += 25.0 * ridge
    region += (substrate - region) * bare


_STAMP_SAMPLERS: dict[str, Callable[[np.random.Generator], _Stamp]] = {
    "streak": _streak_stamp,
    "slag": _slag_stamp,
    "over_melt": _over_melt_stamp,
    "incomplete_spreading": _incomplete_spreading_stamp,
}


# --------------------------------------------------------------------------- encoding


def _encode_jpeg(upright: Image.Image, orientation: int) -> bytes:
    buffer = io.BytesIO()
    if orientation == 1:
        upright.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    else:
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION_TAG] = orientation
        stored = upright.transpose(_STORED_TRANSPOSE_FOR_ORIENTATION[orientation])
        stored.save(buffer, "JPEG", quality=_JPEG_QUALITY, exif=exif.tobytes())
    return buffer.getvalue()


def _per_image_label(job: _ItemJob, boxes: list[_Box], width: int, height: int) -> bytes | None:
    if not job.kind.has_defects or job.label_format == "labelstudio":
        return None
    rng = job.rng(_Stream.LABEL)
    if job.label_format == "yolo":
        return _yolo_label(rng, boxes, width, height)
    return _semicolon_label(rng, job, boxes)


def _yolo_label(rng: np.random.Generator, boxes: list[_Box], width: int, height: int) -> bytes:
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


def _semicolon_label(rng: np.random.Generator, job: _ItemJob, boxes: list[_Box]) -> bytes:
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


def _coordinate_fields(rng: np.random.Generator, boxes: list[_Box], coord_separator: str) -> list[tuple[str, str]]:
    """One (class, coords) pair per line; same-class boxes are sometimes merged into one line."""
    if rng.random() < 0.4:
        by_class: dict[str, list[_Box]] = {}
        for box in boxes:
            by_class.setdefault(box.cls, []).append(box)
        return [(cls, _merged_coordinates(rng, group)) for cls, group in by_class.items()]
    return [(box.cls, coord_separator.join(str(v) for v in (box.x1, box.y1, box.x2, box.y2))) for box in boxes]


def _merged_coordinates(rng: np.random.Generator, boxes: list[_Box]) -> str:
    parts = []
    for box in boxes:
        numbers = [str(v) for v in (box.x1, box.y1, box.x2, box.y2)]
        separators = [str(rng.choice(_MERGED_COORD_SEPARATORS)) for _ in range(3)]
        parts.append("".join(n + s for n, s in zip(numbers, [*separators, ""], strict=True)))
    return "  ".join(parts)


def _write_dataset_level_labels(out: Path, records: list[dict], label_format: str) -> int:
    if label_format == "yolo":
        classes = "".join(f"{DEFECT_CLASSES[cls]}\n" for cls in _YOLO_CLASS_ORDER)
        write_bytes_atomic(out / _ABNORMAL.root / _YOLO_CLASSES_FILE, classes.encode("utf-8"))
        return 1
    if label_format == "labelstudio":
        abnormal = [record for record in records if record["label"] == _ABNORMAL.label]
        tasks = [_labelstudio_task(i, record) for i, record in enumerate(abnormal, start=1)]
        write_bytes_atomic(out / _ABNORMAL.root / _LABELSTUDIO_FILE, _json_bytes(tasks))
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


def _truth_jsonl(records: list[dict]) -> bytes:
    lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return "".join(lines).encode("utf-8")


def _json_bytes(payload: object) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, indent=2) + "\n").encode("utf-8")

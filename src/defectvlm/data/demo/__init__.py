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

import multiprocessing
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from defectvlm.data.demo.background import illumination, powder_albedo, tinted_rgb
from defectvlm.data.demo.defects import defect_classes, paint_defects
from defectvlm.data.demo.items import (
    ABNORMAL,
    CANONICAL_CLASSES,
    DEFAULT_COUNT,
    DEFECT_CLASSES,
    LABEL_FORMATS,
    NORMAL,
    Box,
    ItemJob,
    Stream,
)
from defectvlm.data.demo.label_files import (
    encode_jpeg,
    json_bytes,
    per_image_label,
    truth_jsonl,
    write_dataset_level_labels,
)
from defectvlm.io import write_bytes_atomic

__all__ = ["DEFAULT_COUNT", "DEFECT_CLASSES", "LABEL_FORMATS", "DemoSummary", "generate_demo"]

_ROTATED_FRACTION = 0.05
_TRUTH_FILE = "demo_truth.jsonl"
_SUMMARY_FILE = "demo_summary.json"


@dataclass(frozen=True)
class DemoSummary:
    n_abnormal: int
    n_normal: int
    n_boxes: int
    boxes_per_class: dict[str, int]
    label_format: str
    files_written: int


@dataclass(frozen=True)
class _RenderedItem:
    upright: Image.Image  # RGB, in the displayed frame
    boxes: list[Box]
    orientation: int


@dataclass(frozen=True)
class _ItemResult:
    record: dict
    files_written: int


def generate_demo(
    out: Path,
    *,
    seed: int = 0,
    n_abnormal: int = DEFAULT_COUNT,
    n_normal: int = DEFAULT_COUNT,
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

    write_bytes_atomic(out / _TRUTH_FILE, truth_jsonl(records))
    files_written += 1
    files_written += write_dataset_level_labels(out, records, label_format)

    boxes_per_class = Counter(box["cls"] for record in records for box in record["boxes"])
    summary = DemoSummary(
        n_abnormal=n_abnormal,
        n_normal=n_normal,
        n_boxes=sum(boxes_per_class.values()),
        boxes_per_class={cls: boxes_per_class[cls] for cls in CANONICAL_CLASSES},
        label_format=label_format,
        files_written=files_written + 1,  # counts the summary file itself
    )
    write_bytes_atomic(out / _SUMMARY_FILE, json_bytes(asdict(summary)))
    return summary


def _clear_previous_demo(out: Path) -> None:
    roots = [out / ABNORMAL.root, out / NORMAL.root]
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


def _item_jobs(out: Path, seed: int, n_abnormal: int, n_normal: int, label_format: str) -> list[ItemJob]:
    abnormal = [ItemJob(out, seed, ABNORMAL, i, label_format) for i in range(n_abnormal)]
    normal = [ItemJob(out, seed, NORMAL, i, label_format) for i in range(n_normal)]
    return abnormal + normal


def _run_jobs(jobs: Sequence[ItemJob], workers: int) -> list[_ItemResult]:
    if workers == 1 or len(jobs) <= 1:
        return [_produce_item(job) for job in jobs]
    # "spawn" because callers (CLI, tests) may already hold torch/BLAS threads, which fork
    # can deadlock on. ProcessPoolExecutor rather than Pool: a worker that dies (e.g. a script
    # without a `__main__` guard) raises BrokenProcessPool instead of hanging forever.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
        chunksize = max(1, len(jobs) // (workers * 4))
        return list(executor.map(_produce_item, jobs, chunksize=chunksize))


def _produce_item(job: ItemJob) -> _ItemResult:
    item = _render_item(job)
    width, height = item.upright.size
    image_path = job.out / job.relative_image_path
    write_bytes_atomic(image_path, encode_jpeg(item.upright, item.orientation))
    files_written = 1

    label_text = per_image_label(job, item.boxes, width, height)
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


def _render_item(job: ItemJob) -> _RenderedItem:
    rng = job.rng(Stream.IMAGE)
    width = 8 * int(rng.integers(80, 201))
    height = 8 * int(rng.integers(75, 151))
    orientation = int(rng.choice([6, 8, 3])) if rng.random() < _ROTATED_FRACTION else 1

    albedo = powder_albedo(rng, height, width)
    boxes: list[Box] = []
    if job.kind.has_defects:
        boxes = paint_defects(rng, albedo, defect_classes(rng, cycle_position=job.seed + job.index))
    shaded = albedo * illumination(rng, height, width)
    return _RenderedItem(tinted_rgb(rng, shaded), boxes, orientation)

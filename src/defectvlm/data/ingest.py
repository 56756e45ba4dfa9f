"""Ingest: two folder trees in, one manifest and a report that accounts for every file out.

`scan` does the reading (walk, hash and header of each image, bytes of each small text
file); `build_manifest` is the step's logic, a pure function of what `scan` found and the
parameters. Statuses: accepted (used as is), repaired (used after a counted change:
clipped or dropped boxes, rotated boxes, remapped labels), rejected (not used). Every
reason is a short code; messages name the file and line.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path, PurePosixPath
from typing import Literal

from tqdm import tqdm

from defectvlm.config import Params
from defectvlm.data.images import ImageProbe, probe_image, stored_to_display
from defectvlm.data.labels import (
    LabelError,
    Labels,
    decode_text,
    escapes_root,
    image_name,
    parse_class_names,
    parse_label_text,
    parse_labelstudio,
)
from defectvlm.errors import StepFailure

Root = Literal["abnormal", "normal"]
Status = Literal["accepted", "repaired", "rejected"]
CLASS_NAME_FILES = {"classes.txt": False, "obj.names": False, "data.yaml": True, "data.yml": True}
LABEL_SUFFIXES = {".txt", ".json"}
# Files are probed in-process below this count: a process pool costs more than it saves.
_MIN_FILES_FOR_POOL = 64
UNKNOWN_CLASS = "other"


@dataclass(frozen=True)
class FoundFile:
    root: Root
    rel: str  # POSIX path relative to its root
    path: str  # the root as configured joined with rel
    kind: Literal["image", "label", "class_names", "other"]
    probe: ImageProbe | None = None  # images
    data: bytes | None = None  # label and class-name files

    @property
    def id(self) -> str:
        return f"{self.root}/{self.rel}"


@dataclass
class Outcome:
    """What happened to one file; mutable while the manifest is assembled."""

    status: Status = "accepted"
    reasons: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def reject(self, reason: str, message: str | None = None) -> None:
        self.status = "rejected"
        self.note(reason, message)

    def repair(self, reason: str, message: str | None = None) -> None:
        if self.status == "accepted":
            self.status = "repaired"
        self.note(reason, message)

    def note(self, reason: str, message: str | None = None) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        if message and message not in self.messages:
            self.messages.append(message)


@dataclass(frozen=True)
class IngestResult:
    manifest: list[dict]
    report: dict
    fatal: list[str]  # messages of hard-rule failures; empty when the step passes


# --- reading ---------------------------------------------------------------------------


def scan(params: Params, progress: bool = True) -> list[FoundFile]:
    """Walk both roots, probe every image (in parallel), read label and class-name files."""
    ingest = params.ingest
    extensions = {e.lower() for e in ingest.image_extensions}
    found: list[FoundFile] = []
    for root, folder in (("abnormal", params.data.abnormal_root), ("normal", params.data.normal_root)):
        if not Path(folder).is_dir():
            raise StepFailure(f"data.{root}_root: folder {folder!r} does not exist")
        for rel in _walk(folder):
            name = posixpath.basename(rel)
            suffix = posixpath.splitext(name)[1].lower()
            if suffix in extensions:
                kind = "image"
            elif name.lower() in CLASS_NAME_FILES:
                kind = "class_names"
            elif suffix in LABEL_SUFFIXES:
                kind = "label"
            else:
                kind = "other"
            found.append(FoundFile(root, rel, os.path.join(folder, rel), kind))

    images = [f for f in found if f.kind == "image"]
    texts: dict[str, bytes] = {}

    def read_texts() -> None:
        for f in found:
            if f.kind in ("label", "class_names"):
                texts[f.path] = Path(f.path).read_bytes()

    probes = _probe_all([f.path for f in images], ingest.verify, ingest.workers, progress, while_waiting=read_texts)
    by_path = dict(zip((f.path for f in images), probes, strict=True))
    return [replace(f, probe=by_path.get(f.path), data=texts.get(f.path)) for f in found]


def _walk(folder: str) -> list[str]:
    """Relative POSIX paths of every file under `folder`; symlinked folders are followed once."""
    rels, pending, seen = [], [""], set()
    while pending:
        prefix = pending.pop()
        directory = os.path.join(folder, prefix)
        real = os.path.realpath(directory)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(f"{prefix}{entry.name}/")
                else:
                    rels.append(prefix + entry.name)
    return sorted(rels)


def _probe_all(
    paths: list[str], verify: str, workers: int, progress: bool, while_waiting: Callable[[], None]
) -> list[ImageProbe]:
    """Probe images in a process pool; `while_waiting` runs in this process meanwhile."""
    workers = workers or os.cpu_count() or 1
    bar = {"total": len(paths), "desc": "probe images", "unit": "img", "disable": not progress or None}
    if workers == 1 or len(paths) < _MIN_FILES_FOR_POOL:
        while_waiting()
        return [probe_image(p, verify) for p in tqdm(paths, **bar)]
    chunk = max(1, min(256, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(probe_image, paths, repeat(verify), chunksize=chunk)
        while_waiting()
        return list(tqdm(results, **bar))


# --- the step's logic ------------------------------------------------------------------


def build_manifest(files: list[FoundFile], params: Params) -> IngestResult:
    """Decide every file's status and build the manifest records of usable images."""
    outcomes = {f.path: Outcome() for f in files}
    images = [f for f in files if f.kind == "image"]
    for f in images:
        if f.probe.error:
            outcomes[f.path].reject(f.probe.error, f"{f.path}: {f.probe.detail}")
    for f in files:
        if f.kind == "other":
            outcomes[f.path].reject("unsupported_file", f"{f.path}: not an image, label or class-name file")

    _mark_duplicates(images, outcomes, params.ingest.duplicates)
    labels_of, label_sources = attach_labels(files, outcomes, params)

    manifest, fatal, unknown = [], [], []
    for f in images:
        outcome = outcomes[f.path]
        if outcome.status == "rejected":
            continue
        record = _image_record(f, labels_of.get(f.path), outcome, params, unknown)
        if record is not None and outcome.status != "rejected":
            manifest.append(record)

    _settle_label_files(files, outcomes, label_sources, {r["path"] for r in manifest})

    if unknown:
        fatal.append(
            "labels.unknown_label is 'error' and these raw labels are not in labels.label_map: "
            + ", ".join(sorted({u for u, _ in unknown}))
            + " (first at "
            + unknown[0][1]
            + "); add them to label_map (see `defectvlm scan-labels`) or set unknown_label to other|drop"
        )
    report = _report(files, outcomes, manifest)
    n_images = report["images"]["found"]
    rejected = report["images"]["rejected"]
    if n_images == 0:
        fatal.append("no images found under data.abnormal_root and data.normal_root")
    elif rejected / n_images > params.ingest.max_rejected_fraction:
        fatal.append(
            f"{rejected} of {n_images} images rejected ({rejected / n_images:.1%}), more than "
            f"ingest.max_rejected_fraction = {params.ingest.max_rejected_fraction:.1%}; see ingest_report.json"
        )
    manifest.sort(key=lambda r: r["id"])
    return IngestResult(manifest, report, fatal)


def _mark_duplicates(images: list[FoundFile], outcomes: dict[str, Outcome], policy: str) -> None:
    by_hash: dict[str, list[FoundFile]] = defaultdict(list)
    for f in images:
        if not f.probe.error:
            by_hash[f.probe.blake3].append(f)
    for copies in by_hash.values():
        if len(copies) < 2:
            continue
        copies.sort(key=lambda c: c.id)
        names = ", ".join(c.path for c in copies)
        if len({c.root for c in copies}) > 1:
            for c in copies:
                outcomes[c.path].reject("duplicate_across_roots", f"{c.path}: same content in both roots: {names}")
            continue
        for c in copies[1:] if policy == "reject" else copies:
            message = f"{c.path}: same content as {copies[0].path}" if c is not copies[0] else None
            if policy == "reject":
                outcomes[c.path].reject("duplicate_content", message)
            else:
                outcomes[c.path].note("duplicate_content", f"{c.path}: identical copies: {names}")


def attach_labels(
    files: list[FoundFile], outcomes: dict[str, Outcome], params: Params
) -> tuple[dict[str, Labels | LabelError], dict[str, list[str]]]:
    """Parse label files and pair them with images. Returns image path -> its labels (or the
    error that makes them unusable), and image path -> the label files that describe it."""
    fmt = params.labels.format
    images = [f for f in files if f.kind == "image"]
    by_stem: dict[tuple[Root, str], list[FoundFile]] = defaultdict(list)
    by_name: dict[str, list[FoundFile]] = defaultdict(list)
    for f in images:
        by_stem[(f.root, _stem_key(f.rel))].append(f)
        if f.root == "abnormal":
            by_name[posixpath.basename(f.rel).lower()].append(f)

    name_files = {(f.root, PurePosixPath(f.rel)): f for f in files if f.kind == "class_names"}
    labels_of: dict[str, Labels | LabelError] = {}
    sources: dict[str, list[str]] = defaultdict(list)

    def pair(image: FoundFile, labels: Labels | LabelError, source: FoundFile) -> None:
        sources[image.path].append(source.path)
        if image.path in labels_of:
            labels_of[image.path] = LabelError("multiple_labels", f"described by {', '.join(sources[image.path])}")
        else:
            labels_of[image.path] = labels

    for f in files:
        if f.kind != "label":
            continue
        outcome = outcomes[f.path]
        suffix = posixpath.splitext(f.rel)[1].lower()
        if suffix == ".json":
            if f.root == "normal" or fmt not in ("auto", "labelstudio"):
                outcome.reject(
                    "unsupported_file", f"{f.path}: JSON is read only as a Label Studio export in abnormal_root"
                )
                continue
            _attach_labelstudio(f, outcome, by_name, pair)
            continue
        if fmt == "labelstudio":
            outcome.reject("unsupported_file", f"{f.path}: labels.format is labelstudio, .txt files are not read")
            continue
        matches = by_stem.get((f.root, _stem_key(f.rel)), [])
        if not matches:
            outcome.reject("orphan_label", f"{f.path}: no image with the same name beside it")
            continue
        if len(matches) > 1:
            for image in matches:
                pair(image, LabelError("ambiguous_label", f"{f.path} could describe several images"), f)
            outcome.reject(
                "ambiguous_label", f"{f.path}: several images share its name: {', '.join(m.path for m in matches)}"
            )
            continue
        try:
            labels = parse_label_text(
                f.data, fmt, params.labels.coord_format, lambda f=f: _class_names_for(f, name_files, outcomes)
            )
        except LabelError as exc:
            outcome.reject(exc.code, exc.located(f.path))
            pair(matches[0], LabelError(exc.code, f"label {exc.located(f.path)}"), f)
            continue
        pair(matches[0], labels, f)
    return labels_of, sources


def _attach_labelstudio(f: FoundFile, outcome: Outcome, by_name, pair) -> None:
    try:
        text, _ = decode_text(f.data)
        tasks = parse_labelstudio(text)
    except LabelError as exc:
        outcome.reject(exc.code, exc.located(f.path))
        return
    for task_number, labels in enumerate(tasks, start=1):
        candidates = by_name.get(labels.image_ref.lower(), [])
        if not candidates:
            # Label Studio prefixes uploaded files with 8 hex characters and a dash.
            stripped = labels.image_ref.split("-", 1)[-1].lower()
            candidates = by_name.get(stripped, [])
        if len(candidates) != 1:
            problem = "orphan_task" if not candidates else "ambiguous_task"
            outcome.repair(
                problem, f"{f.path}: task #{task_number} names {labels.image_ref!r}, matching {len(candidates)} images"
            )
            continue
        pair(candidates[0], labels, f)


def _class_names_for(
    label: FoundFile, name_files: dict[tuple[Root, PurePosixPath], FoundFile], outcomes: dict[str, Outcome]
) -> list[str] | None:
    """The nearest classes.txt / data.yaml at or above the label's folder, within its root."""
    folder = PurePosixPath(label.rel).parent
    for parent in (folder, *folder.parents):
        for name, is_yaml in CLASS_NAME_FILES.items():
            source = name_files.get((label.root, parent / name))
            if source is None:
                continue
            try:
                names = parse_class_names(decode_text(source.data)[0], is_yaml)
            except LabelError as exc:
                outcomes[source.path].reject(exc.code, exc.located(source.path))
                raise LabelError(exc.code, f"class names in {source.path}: {exc}") from None
            outcomes[source.path].note("class_names_used")
            return names
    return None


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0].lower()


def _stem_key(rel: str) -> str:
    return posixpath.splitext(rel)[0].lower()


def _image_record(
    f: FoundFile, labels: Labels | LabelError | None, outcome: Outcome, params: Params, unknown: list
) -> dict | None:
    probe = f.probe
    if probe.orientation != 1:
        if params.ingest.exif_policy == "reject":
            outcome.reject("exif_rotated", f"{f.path}: EXIF orientation {probe.orientation}")
            return None
        outcome.note("exif_rotated", f"{f.path}: EXIF orientation {probe.orientation}, used upright")
    width, height = probe.display_size
    record = {
        "id": f.id,
        "path": f.path,
        "blake3": probe.blake3,
        "bytes": probe.size_bytes,
        "format": probe.format,
        "width": width,
        "height": height,
        "orientation": probe.orientation,
        "label": f.root,
        "boxes": [],
        "group": posixpath.dirname(f.rel) or ".",
    }
    if f.root == "normal":
        if isinstance(labels, LabelError):
            outcome.reject(labels.code, f"{f.path}: its label file is unusable")
        elif labels is not None and labels.boxes:
            outcome.reject("label_in_normal_root", f"{f.path}: a normal image has a label file with boxes")
        return record
    if labels is None:
        outcome.reject("missing_label", f"{f.path}: abnormal image without a label file")
        return None
    if isinstance(labels, LabelError):
        outcome.reject(labels.code, f"{f.path}: {labels}")
        return None
    record["boxes"] = _boxes(f, labels, outcome, params, unknown)
    if outcome.status != "rejected" and not record["boxes"]:
        outcome.reject("no_valid_boxes", f"{f.path}: abnormal image with no usable box")
    return record


def _boxes(f: FoundFile, labels: Labels, outcome: Outcome, params: Params, unknown: list) -> list[dict]:
    probe = f.probe
    width, height = probe.display_size
    on_stored = params.ingest.exif_policy == "labels_on_stored" and probe.orientation != 1
    frame_w, frame_h = probe.stored_size if on_stored else (width, height)
    if labels.declared_size and labels.declared_size != (frame_w, frame_h):
        outcome.reject(
            "size_mismatch", f"{f.path}: labels made on a {labels.declared_size} image, file is {(frame_w, frame_h)}"
        )
        return []
    stem = _stem(f.rel)
    boxes = []
    for box in labels.boxes:
        where = f"{f.path} (label line {box.line})"
        if box.filename is not None:
            if escapes_root(box.filename):
                outcome.reject("path_escape", f"{where}: filename {box.filename!r} leaves the root")
                return []
            if _stem(image_name(box.filename)) != stem:
                outcome.reject("filename_mismatch", f"{where}: filename column {box.filename!r} names another image")
                return []
        canonical = params.labels.canonical(box.label)
        if canonical is None:
            policy = params.labels.unknown_label
            if policy == "error":
                unknown.append((box.label, where))
                outcome.reject("unknown_label", f"{where}: raw label {box.label!r} not in label_map")
                return []
            if policy == "drop":
                outcome.repair("unknown_label_dropped", f"{where}: box with unknown label {box.label!r} dropped")
                continue
            outcome.repair(
                "unknown_label_as_other", f"{where}: unknown label {box.label!r} mapped to {UNKNOWN_CLASS!r}"
            )
            canonical = UNKNOWN_CLASS
        x1, y1, x2, y2 = box.xyxy
        if labels.frame == "unit":
            x1, y1, x2, y2 = x1 * frame_w, y1 * frame_h, x2 * frame_w, y2 * frame_h
        if x2 <= x1 or y2 <= y1:
            outcome.reject("box_degenerate", f"{where}: box {list(box.xyxy)} has no area")
            return []
        if on_stored:
            x1, y1, x2, y2 = stored_to_display((x1, y1, x2, y2), probe.orientation, probe.stored_size)
            outcome.repair("exif_boxes_rotated", f"{f.path}: boxes moved from stored to displayed frame")
        xyxy = [round(v, 2) for v in (x1, y1, x2, y2)]
        limits = (float(width), float(height)) * 2
        clipped = [min(max(v, 0.0), limit) for v, limit in zip(xyxy, limits, strict=True)]
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            outcome.reject("box_outside_image", f"{where}: box {xyxy} lies outside the {width}x{height} image")
            return []
        if clipped != xyxy:
            outcome.repair("box_clipped", f"{where}: box {xyxy} clipped to {clipped}")
        if min(clipped[2] - clipped[0], clipped[3] - clipped[1]) < params.ingest.min_box_size:
            outcome.repair("box_too_small", f"{where}: box {clipped} smaller than min_box_size, dropped")
            continue
        boxes.append({"xyxy": clipped, "cls": canonical, "raw": box.label})
    return boxes


def _settle_label_files(
    files: list[FoundFile], outcomes: dict[str, Outcome], sources: dict[str, list[str]], used_images: set[str]
) -> None:
    """A label file is accepted when it describes an image in the manifest, else rejected."""
    used_labels = {label for image, labels in sources.items() if image in used_images for label in labels}
    for f in files:
        outcome = outcomes[f.path]
        if f.kind == "label" and outcome.status != "rejected" and f.path not in used_labels:
            outcome.reject("image_rejected", f"{f.path}: the image it describes was rejected")
        if f.kind == "class_names" and "class_names_used" not in outcome.reasons and outcome.status != "rejected":
            outcome.reject("unused_class_names", f"{f.path}: no YOLO label file used it")


def _report(files: list[FoundFile], outcomes: dict[str, Outcome], manifest: list[dict]) -> dict:
    entries = []
    for f in sorted(files, key=lambda f: f.path):
        outcome = outcomes[f.path]
        entry = {"path": f.path, "kind": f.kind, "status": outcome.status, "reasons": outcome.reasons}
        if outcome.messages:
            entry["messages"] = outcome.messages
        entries.append(entry)
    counts = Counter(e["status"] for e in entries)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    for e in entries:
        by_kind[e["kind"]][e["status"]] += 1
        reasons.update(e["reasons"])
    images = by_kind["image"]
    boxes_per_class = Counter(b["cls"] for r in manifest for b in r["boxes"])
    return {
        "counts": {s: counts[s] for s in ("accepted", "repaired", "rejected")} | {"total": len(entries)},
        "counts_by_kind": {
            k: {s: v[s] for s in ("accepted", "repaired", "rejected")} for k, v in sorted(by_kind.items())
        },
        "images": {
            "found": sum(images.values()),
            "in_manifest": len(manifest),
            "rejected": images["rejected"],
            "normal": sum(r["label"] == "normal" for r in manifest),
            "abnormal": sum(r["label"] == "abnormal" for r in manifest),
            "boxes": sum(boxes_per_class.values()),
            "boxes_per_class": dict(sorted(boxes_per_class.items())),
        },
        "reasons": dict(sorted(reasons.items())),
        "files": entries,
    }

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
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path

from tqdm import tqdm

from defectvlm.config import Params
from defectvlm.data.found import FoundFile, Kind, Outcome
from defectvlm.data.images import ImageProbe, probe_image
from defectvlm.data.pairing import CLASS_NAME_FILES, attach_labels, in_labelled_tree, labelled_trees
from defectvlm.data.records import image_record
from defectvlm.errors import StepFailure

LABEL_SUFFIXES = {".txt", ".json"}
# Files labelling and training tools write into a dataset: Ultralytics' label caches, the
# notes of a Label Studio YOLO export. Counted, never read.
TOOL_FILE_SUFFIXES = {".cache"}
TOOL_FILE_NAMES = {"notes.json"}
# Files are probed in-process below this count: a process pool costs more than it saves.
_MIN_FILES_FOR_POOL = 64


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
            found.append(FoundFile(root, rel, os.path.join(folder, rel), file_kind(rel, extensions)))

    images = [f for f in found if f.kind == "image"]
    texts: dict[str, bytes] = {}

    def read_texts() -> None:
        for f in found:
            if f.kind in ("label", "class_names"):
                texts[f.path] = Path(f.path).read_bytes()

    probes = _probe_all([f.path for f in images], ingest.verify, ingest.workers, progress, while_waiting=read_texts)
    by_path = dict(zip((f.path for f in images), probes, strict=True))
    return [replace(f, probe=by_path.get(f.path), data=texts.get(f.path)) for f in found]


def file_kind(rel: str, image_extensions: set[str]) -> Kind:
    name = posixpath.basename(rel).lower()
    suffix = posixpath.splitext(name)[1]
    if suffix in image_extensions:
        return "image"
    if name in CLASS_NAME_FILES:
        return "class_names"
    if suffix in TOOL_FILE_SUFFIXES or name in TOOL_FILE_NAMES:
        return "tool_file"
    if suffix in LABEL_SUFFIXES:
        return "label"
    return "other"


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
        if f.kind == "tool_file":
            outcomes[f.path].reject("tool_file", f"{f.path}: written by a labelling or training tool, not read")

    _mark_duplicates(images, outcomes, params.ingest.duplicates)
    labels_of, label_sources = attach_labels(files, outcomes, params)

    trees = labelled_trees(files)
    manifest, fatal, unknown = [], [], []
    for f in images:
        outcome = outcomes[f.path]
        if outcome.status == "rejected":
            continue
        background = f.root == "abnormal" and in_labelled_tree(f, trees)
        record = image_record(f, labels_of.get(f.path), outcome, params, unknown, background)
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

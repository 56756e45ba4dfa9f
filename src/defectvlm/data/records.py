"""One image's manifest record: its frame (EXIF applied), its boxes mapped, checked and
clipped in that frame, and the outcome that says what was changed or why it was rejected.
"""

from __future__ import annotations

import posixpath

from defectvlm.config import Params
from defectvlm.data.found import FoundFile, Outcome
from defectvlm.data.images import stored_to_display
from defectvlm.data.labels import LabelError, Labels, escapes_root, image_name, strip_upload_prefix
from defectvlm.data.pairing import stem

UNKNOWN_CLASS = "other"


def image_record(
    f: FoundFile,
    labels: Labels | LabelError | None,
    outcome: Outcome,
    params: Params,
    unknown: list,
    background: bool = False,
) -> dict | None:
    """The manifest record of one image (None when rejected); `background`: the image lies in an
    Ultralytics tree, where a missing or empty label file means an image without defects."""
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
    if isinstance(labels, LabelError):
        outcome.reject(labels.code, f"{f.path}: {labels}")
        return None
    if labels is not None and labels.origin == "predictions_only":
        outcome.reject(
            "predictions_only",
            f"{f.path}: its Label Studio task has model predictions (pre-annotations) but no human annotation; "
            "set labels.use_predictions: true to use the predictions as labels",
        )
        return None
    if background and (labels is None or not labels.boxes):
        if params.labels.background_images == "normal":
            outcome.note("background_image", f"{f.path}: no box in its Ultralytics label tree, used as normal")
            return {**record, "label": "normal"}
        outcome.reject("background_image", f"{f.path}: no box in its Ultralytics label tree (labels.background_images)")
        return None
    if labels is None:
        outcome.reject("missing_label", f"{f.path}: abnormal image without a label file")
        return None
    if labels.origin == "prediction":
        outcome.note("labels_from_predictions", f"{f.path}: boxes from Label Studio predictions (use_predictions)")
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
    own_stem = stem(f.rel)
    boxes = []
    for box in labels.boxes:
        where = f"{f.path} (label line {box.line})"
        if box.filename is not None:
            if escapes_root(box.filename):
                outcome.reject("path_escape", f"{where}: filename {box.filename!r} leaves the root")
                return []
            named = stem(image_name(box.filename))
            if own_stem not in (named, strip_upload_prefix(named)):
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

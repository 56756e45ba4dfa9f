"""Which label file describes which image.

A `.txt` label describes the image with the same name beside it, or, in the Ultralytics
layout (`images/<split>/x.jpg` with `labels/<split>/x.txt`), the image whose path maps to
the label's by replacing the last `images` folder with `labels`. Label Studio prefixes
uploaded files with 8 hex digits and a dash (`3f2a9c1d-x.jpg`): a label name with that
prefix also matches the image without it, in every format. Label Studio JSON exports (full
or JSON-MIN) name their images; tasks are matched by file name within the abnormal root.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Callable
from pathlib import PurePosixPath

from defectvlm.config import Params
from defectvlm.data.found import FoundFile, Outcome, Root
from defectvlm.data.labels import (
    LabelError,
    Labels,
    decode_text,
    parse_class_names,
    parse_label_text,
    parse_labelstudio,
    strip_upload_prefix,
)

CLASS_NAME_FILES = {"classes.txt": False, "obj.names": False, "data.yaml": True, "data.yml": True}
YOLO_IMAGES, YOLO_LABELS = "images", "labels"

Pair = Callable[[FoundFile, "Labels | LabelError", FoundFile], None]


def attach_labels(
    files: list[FoundFile], outcomes: dict[str, Outcome], params: Params
) -> tuple[dict[str, Labels | LabelError], dict[str, list[str]]]:
    """Parse label files and pair them with images. Returns image path -> its labels (or the
    error that makes them unusable), and image path -> the label files that describe it."""
    fmt = params.labels.format
    by_key: dict[tuple[Root, str], list[FoundFile]] = defaultdict(list)
    by_name: dict[str, list[FoundFile]] = defaultdict(list)
    for f in files:
        if f.kind != "image":
            continue
        by_key[(f.root, stem_key(f.rel))].append(f)
        mapped = yolo_label_key(f.rel)
        if mapped is not None:
            by_key[(f.root, mapped)].append(f)
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
            _attach_labelstudio(f, outcome, by_name, pair, params.labels.use_predictions)
            continue
        if fmt == "labelstudio":
            outcome.reject("unsupported_file", f"{f.path}: labels.format is labelstudio, .txt files are not read")
            continue
        key = stem_key(f.rel)
        matches = by_key.get((f.root, key)) or by_key.get((f.root, _without_upload_prefix(key)), [])
        if not matches:
            outcome.reject("orphan_label", f"{f.path}: no image with the same name beside it or in its images/ twin")
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


def _attach_labelstudio(f: FoundFile, outcome: Outcome, by_name, pair: Pair, use_predictions: bool) -> None:
    try:
        text, _ = decode_text(f.data)
        tasks = parse_labelstudio(text, use_predictions)
    except LabelError as exc:
        outcome.reject(exc.code, exc.located(f.path))
        return
    for task_number, labels in enumerate(tasks, start=1):
        name = labels.image_ref.lower()
        candidates = by_name.get(name) or by_name.get(strip_upload_prefix(name), [])
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


def stem(name: str) -> str:
    """A file's name without folder and suffix, lower case."""
    return posixpath.splitext(posixpath.basename(name))[0].lower()


def stem_key(rel: str) -> str:
    return posixpath.splitext(rel)[0].lower()


def _without_upload_prefix(key: str) -> str:
    folder, name = posixpath.split(key)
    return posixpath.join(folder, strip_upload_prefix(name))


def _split_at_last(rel: str, folder: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The folders before and after the last `folder` component of rel's parent, if any."""
    parts = PurePosixPath(rel).parts[:-1]
    if folder not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index(folder)
    return parts[:at], parts[at + 1 :]


def yolo_label_key(image_rel: str) -> str | None:
    """The stem key of the label an Ultralytics tree keeps for this image (`images` -> `labels`)."""
    split = _split_at_last(image_rel, YOLO_IMAGES)
    if split is None:
        return None
    before, after = split
    return stem_key(posixpath.join(*before, YOLO_LABELS, *after, posixpath.basename(image_rel)))


def labelled_trees(files: list[FoundFile]) -> set[tuple[Root, tuple[str, ...]]]:
    """(root, folder) of every Ultralytics tree: a folder whose `labels/` holds a label file."""
    trees = set()
    for f in files:
        split = _split_at_last(f.rel, YOLO_LABELS) if f.kind == "label" else None
        if split is not None:
            trees.add((f.root, split[0]))
    return trees


def in_labelled_tree(image: FoundFile, trees: set[tuple[Root, tuple[str, ...]]]) -> bool:
    split = _split_at_last(image.rel, YOLO_IMAGES)
    return split is not None and (image.root, split[0]) in trees

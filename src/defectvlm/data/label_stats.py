"""scan-labels: what the raw labels look like before anyone writes a label_map.

Counts raw labels, boxes per image and box sizes, lists unreadable label lines, and
renders a `label_map` block for params.yaml that keeps the mappings already configured.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import yaml

from defectvlm.config import Params
from defectvlm.data.ingest import FoundFile, Outcome, attach_labels
from defectvlm.data.labels import Labels


def label_stats(files: list[FoundFile], params: Params) -> dict:
    """Statistics of the abnormal root's labels, as found by `ingest.scan`."""
    outcomes = {f.path: Outcome() for f in files}
    labels_of, _ = attach_labels(files, outcomes, params)
    images = {f.path: f for f in files if f.kind == "image" and f.root == "abnormal"}
    raw_boxes: Counter = Counter()
    raw_images: Counter = Counter()
    boxes_per_image: Counter = Counter()
    formats: Counter = Counter()
    encodings: Counter = Counter()
    widths, heights = [], []
    for path, image in sorted(images.items()):
        labels = labels_of.get(path)
        if not isinstance(labels, Labels):
            continue
        formats[labels.format] += 1
        encodings[labels.encoding] += 1
        boxes_per_image[len(labels.boxes)] += 1
        raw_images.update({b.label for b in labels.boxes})
        raw_boxes.update(b.label for b in labels.boxes)
        scale = image.probe.display_size if labels.frame == "unit" and image.probe.stored_size else (1, 1)
        for box in labels.boxes:
            x1, y1, x2, y2 = box.xyxy
            widths.append((x2 - x1) * scale[0])
            heights.append((y2 - y1) * scale[1])
    problems = sorted({m for f in files if f.kind in ("label", "class_names") for m in outcomes[f.path].messages})
    return {
        "label_files": sum(formats.values()),
        "formats": dict(sorted(formats.items())),
        "encodings": dict(sorted(encodings.items())),
        "images_without_labels": sum(1 for p in images if p not in labels_of),
        "raw_labels": {
            raw: {"boxes": raw_boxes[raw], "images": raw_images[raw], "maps_to": params.labels.canonical(raw)}
            for raw in sorted(raw_boxes, key=lambda r: (-raw_boxes[r], r))
        },
        "boxes_per_image": {str(k): boxes_per_image[k] for k in sorted(boxes_per_image)},
        "box_width_px": _percentiles(widths),
        "box_height_px": _percentiles(heights),
        "problems": problems,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    points = np.percentile(np.asarray(values), [0, 5, 50, 95, 100])
    return dict(zip(("min", "p5", "median", "p95", "max"), (round(float(p), 1) for p in points), strict=True))


def label_map_block(stats: dict) -> str:
    """A ready-to-paste `labels.label_map` block; unmapped labels map to themselves, marked TODO."""
    lines = ["labels:", "  label_map:"]
    for raw, info in stats["raw_labels"].items():
        target = info["maps_to"] if info["maps_to"] is not None else raw
        entry = yaml.safe_dump({raw: target}, allow_unicode=True, default_flow_style=False).strip()
        note = f"{info['boxes']} boxes in {info['images']} images"
        if info["maps_to"] is None:
            note += "; TODO: not in label_map yet, choose its class"
        lines.append(f"    {entry}  # {note}")
    return "\n".join(lines) + "\n"

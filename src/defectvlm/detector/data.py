"""Training material for the detector: split records letterboxed once, crops and targets per step.

Boxes are the manifest's label boxes (pixels of the upright image, the frame every step uses),
kept when at least `regions.min_box_size` on both sides, like the regions step's positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from defectvlm.data.images import load_upright
from defectvlm.detector.model import STRIDE
from defectvlm.detector.runtime import Letterbox, letterbox

GAUSSIAN_ALPHA = 0.54  # share of a box's extent its centre peak spreads over (TTFNet's elliptic targets)
REGRESSION_SHARE = 0.54  # middle share of a box whose cells regress it


@dataclass
class Letterboxed:
    image_id: str
    canvas: np.ndarray  # uint8 [S, S, 3]
    box: Letterbox
    width: int
    height: int
    boxes: np.ndarray  # float32 [k, 4] xyxy in canvas pixels
    labels: np.ndarray  # int64 [k]


def truth_boxes(record: dict, min_box_size: float) -> list[dict]:
    """The record's label boxes a detector should find (same size filter as the regions step)."""
    return [
        b
        for b in record.get("boxes") or []
        if min(b["xyxy"][2] - b["xyxy"][0], b["xyxy"][3] - b["xyxy"][1]) >= min_box_size
    ]


def letterbox_records(records: list[dict], classes: list[str], size: int, min_box_size: float) -> list[Letterboxed]:
    number = {cls: i for i, cls in enumerate(classes)}
    out = []
    for record in records:
        canvas, box = letterbox(load_upright(record["path"]), size, size)
        truths = truth_boxes(record, min_box_size)
        xyxy = np.array([t["xyxy"] for t in truths], dtype=np.float32).reshape(-1, 4)
        xyxy = xyxy * box.scale + np.array([box.left, box.top, box.left, box.top], dtype=np.float32)
        labels = np.array([number[t["cls"]] for t in truths], dtype=np.int64)
        out.append(Letterboxed(record["id"], canvas, box, record["width"], record["height"], xyxy, labels))
    return out


def random_crop(item: Letterboxed, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crop (on a defect centre most of the time), randomly flipped: image, boxes, labels."""
    size = item.canvas.shape[0]
    if len(item.boxes) and rng.random() < 0.7:
        x1, y1, x2, y2 = item.boxes[rng.integers(len(item.boxes))]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left = int(np.clip(cx - rng.uniform(0.15, 0.85) * crop, 0, size - crop))
        top = int(np.clip(cy - rng.uniform(0.15, 0.85) * crop, 0, size - crop))
    else:
        left, top = int(rng.integers(0, size - crop + 1)), int(rng.integers(0, size - crop + 1))
    image = item.canvas[top : top + crop, left : left + crop]
    boxes = item.boxes - np.array([left, top, left, top], dtype=np.float32)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = np.all((centres >= 0) & (centres < crop), axis=1)
    boxes, labels = boxes[inside], item.labels[inside]
    if rng.random() < 0.5:
        image = image[:, ::-1]
        boxes = np.stack([crop - boxes[:, 2], boxes[:, 1], crop - boxes[:, 0], boxes[:, 3]], axis=1)
    if rng.random() < 0.5:
        image = image[::-1]
        boxes = np.stack([boxes[:, 0], crop - boxes[:, 3], boxes[:, 2], crop - boxes[:, 1]], axis=1)
    return np.ascontiguousarray(image), boxes.reshape(-1, 4), labels


def targets(boxes: np.ndarray, labels: np.ndarray, num_classes: int, size: int) -> dict[str, np.ndarray]:
    """Targets on the stride-4 grid (TTFNet-style): elliptic Gaussian heatmaps (1 at each centre
    cell); around each centre (the middle REGRESSION_SHARE of the box) every cell regresses the
    whole box, weighted by the Gaussian, so a long streak's box does not hang on one cell."""
    cells = size // STRIDE
    heat = np.zeros((num_classes, cells, cells), dtype=np.float32)
    box_target = np.zeros((4, cells, cells), dtype=np.float32)
    weight = np.zeros((cells, cells), dtype=np.float32)
    ys, xs = np.mgrid[0:cells, 0:cells].astype(np.float32)
    order = np.argsort(-((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])), kind="stable")
    for k in order:  # larger boxes first: where two overlap, the smaller one's cells win
        x1, y1, x2, y2 = boxes[k]
        w, h = max(x2 - x1, 1.0) / STRIDE, max(y2 - y1, 1.0) / STRIDE
        cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
        col, row = min(max(int(cx), 0), cells - 1), min(max(int(cy), 0), cells - 1)
        sx, sy = max(GAUSSIAN_ALPHA * w / 6, 0.5), max(GAUSSIAN_ALPHA * h / 6, 0.5)
        peak = np.exp(-((xs - col) ** 2) / (2 * sx**2) - ((ys - row) ** 2) / (2 * sy**2))
        heat[labels[k]] = np.maximum(heat[labels[k]], peak)
        heat[labels[k], row, col] = 1.0
        near_x = np.abs(xs + 0.5 - cx) <= REGRESSION_SHARE * w / 2
        region = near_x & (np.abs(ys + 0.5 - cy) <= REGRESSION_SHARE * h / 2)
        region[row, col] = True
        box_target[:, region] = np.array([x1, y1, x2, y2], dtype=np.float32)[:, None]
        weight[region] = peak[region]
    return {"heat": heat, "box": box_target, "weight": weight}


def batch(
    items: list[Letterboxed], crop: int, num_classes: int, rng: np.random.Generator, size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`size` random crops: images [B, 3, crop, crop] in [0, 1] and stacked targets."""
    images, parts = [], []
    for index in rng.integers(len(items), size=size):
        image, boxes, labels = random_crop(items[index], crop, rng)
        images.append(image)
        parts.append(targets(boxes, labels, num_classes, crop))
    stacked = {key: torch.from_numpy(np.stack([p[key] for p in parts])) for key in parts[0]}
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return pixels, stacked

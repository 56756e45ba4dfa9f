"""Box-level metrics shared by the detector's training report and the cascade evaluation.

Greedy matching at IoU >= 0.5: predictions in decreasing score order each take the
unmatched truth they overlap most (when that IoU reaches the threshold); a prediction left
without a truth is a false alarm. `class_aware` matches only within a class (per-class
figures and mAP); without it a proposal that finds a defect counts whatever class it guessed
(the cascade's VLM names the class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from defectvlm.data.boxes import iou

IOU_MATCH = 0.5


@dataclass(frozen=True)
class Box:
    xyxy: Sequence[float]
    cls: str
    score: float = 1.0


def match(predictions: list[Box], truths: list[Box], class_aware: bool, iou_min: float = IOU_MATCH) -> list[bool]:
    """For each prediction (in the order given), whether it is a true positive."""
    order = sorted(range(len(predictions)), key=lambda i: -predictions[i].score)
    taken = [False] * len(truths)
    hits = [False] * len(predictions)
    for i in order:
        best, best_iou = -1, iou_min
        for j, truth in enumerate(truths):
            if taken[j] or (class_aware and truth.cls != predictions[i].cls):
                continue
            overlap = iou(list(predictions[i].xyxy), list(truth.xyxy))
            if overlap >= best_iou:
                best, best_iou = j, overlap
        if best >= 0:
            taken[best] = True
            hits[i] = True
    return hits


def scored_hits(
    images: list[tuple[list[Box], list[Box]]], class_aware: bool, cls: str | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, hit flags) of every prediction over all images, and the number of truths
    (restricted to `cls` when given)."""
    scores, hits, truths_total = [], [], 0
    for predictions, truths in images:
        if cls is not None:
            predictions = [p for p in predictions if p.cls == cls]
            truths = [t for t in truths if t.cls == cls]
        truths_total += len(truths)
        scores += [p.score for p in predictions]
        hits += match(predictions, truths, class_aware)
    return np.array(scores, dtype=np.float64), np.array(hits, dtype=bool), truths_total


def average_precision(scores: np.ndarray, hits: np.ndarray, truths: int) -> float:
    """Area under the interpolated precision-recall curve (all points, as VOC 2010+ / COCO at one IoU)."""
    if truths == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / truths
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [recall[-1] if len(recall) else 0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def pr_curve(scores: np.ndarray, hits: np.ndarray, truths: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and the threshold at each distinct score (highest first)."""
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / max(truths, 1)
    return precision, recall, scores[order]


def counts_at(images: list[tuple[list[Box], list[Box]]], threshold: float, class_aware: bool) -> dict:
    """Precision, recall, F1 and false alarms per image of the predictions scoring >= threshold."""
    kept = [([p for p in preds if p.score >= threshold], truths) for preds, truths in images]
    _, hits, truths = scored_hits(kept, class_aware)
    tp, predicted = int(hits.sum()), len(hits)
    precision = tp / predicted if predicted else 0.0
    recall = tp / truths if truths else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "true_positives": tp,
        "false_alarms": predicted - tp,
        "false_alarms_per_image": round((predicted - tp) / max(len(images), 1), 4),
        "truths": truths,
    }


def detector_metrics(images: list[tuple[list[Box], list[Box]]], classes: list[str]) -> dict:
    """mAP@0.5 (class-aware, classes with truths), per-class AP and class-agnostic recall."""
    per_class = {}
    for cls in classes:
        scores, hits, truths = scored_hits(images, True, cls)
        if truths:
            per_class[cls] = round(average_precision(scores, hits, truths), 4)
    _, hits, truths = scored_hits(images, False)
    return {
        "map50": round(float(np.mean(list(per_class.values()))), 4) if per_class else 0.0,
        "ap50_per_class": per_class,
        "recall_at_budget": round(float(hits.sum()) / truths, 4) if truths else 0.0,
        "proposals_per_image": round(len(hits) / max(len(images), 1), 3),
        "truths": truths,
    }

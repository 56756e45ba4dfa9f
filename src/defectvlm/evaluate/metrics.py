"""ROI- and image-level metrics from scores, with scikit-learn doing the arithmetic."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def best_f1_threshold(scores, hits, positives: int, nothing_found: float) -> tuple[float, float]:
    """The score threshold (a score >= it is flagged) with the highest F1, and that F1: the one rule
    for every threshold chosen on val (the VLM's ROI threshold, the cascade's box thresholds).
    `hits` marks the scores that are true positives; `positives` counts every positive, also those
    no score stands for (a defect the detector put no box on). The candidates are the distinct
    scores; when none flags a positive, `nothing_found` (F1 0).

    Ties go to the lowest threshold: of two settings equally good on val, the one that flags more
    catches more defects, and on an inspection line a missed defect (a bad part shipped) costs more
    than a false alarm (a second look)."""
    scores, hits = np.asarray(scores, dtype=np.float64), np.asarray(hits, dtype=bool)
    if not hits.any():
        return nothing_found, 0.0
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    last_of_each_score = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    true_positives = np.cumsum(hits[order])[last_of_each_score]
    # F1 = 2 TP / (flagged + positives): ratios of integers, so equally good thresholds tie exactly
    f1 = 2 * true_positives / (last_of_each_score + 1 + positives)
    lowest_best = np.flatnonzero(f1 == f1.max())[-1]  # the scores descend
    return float(ranked[last_of_each_score[lowest_best]]), float(f1[lowest_best])


def best_threshold(truth: list[int], scores: list[float]) -> tuple[float, float]:
    """The ROI threshold with the highest F1 on these scores (the validation split), and that F1;
    0.5 when no region is abnormal."""
    return best_f1_threshold(scores, truth, sum(truth), nothing_found=0.5)


def binary_metrics(truth: list[int], scores: list[float], threshold: float) -> dict:
    truth_arr = np.asarray(truth, dtype=int)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(truth_arr, predicted, average="binary", zero_division=0)
    tn, fp, fn, tp = confusion_matrix(truth_arr, predicted, labels=[0, 1]).ravel()
    both_classes = 0 < truth_arr.sum() < len(truth_arr)
    return {
        "precision": round(float(precision), 4),
        "recall": round(float(recall), 4),
        "f1": round(float(f1), 4),
        "auroc": round(float(roc_auc_score(truth_arr, scores)), 4) if both_classes else None,
        "average_precision": round(float(average_precision_score(truth_arr, scores)), 4) if both_classes else None,
        "counts": {"tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)},
        "n": len(truth_arr),
    }


def class_metrics(truth: list[str], predicted: list[str], classes: list[str]) -> dict:
    """Defect-type accuracy on true abnormal regions, per class, and the confusion matrix."""
    if not truth:
        return {"accuracy": None, "per_class_accuracy": {}, "confusion_matrix": {"labels": classes, "matrix": []}}
    matrix = confusion_matrix(truth, predicted, labels=classes)
    per_class = {
        cls: round(float(matrix[i, i] / matrix[i].sum()), 4) if matrix[i].sum() else None
        for i, cls in enumerate(classes)
    }
    return {
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "per_class_accuracy": per_class,
        "confusion_matrix": {"labels": classes, "matrix": matrix.tolist()},
    }


def evaluate_rows(rows: list[dict], images: dict[str, dict], threshold: float, classes: list[str]) -> dict:
    roi_truth = [int(r["truth"] == "abnormal") for r in rows]
    image_ids = sorted(images)
    abnormal_rows = [r for r in rows if r["truth"] == "abnormal" and r.get("pred_cls")]
    return {
        "threshold": round(threshold, 6),
        "roi": binary_metrics(roi_truth, [r["score"] for r in rows], threshold),
        "image": binary_metrics(
            [int(images[i]["truth"] == "abnormal") for i in image_ids],
            [images[i]["score"] for i in image_ids],
            threshold,
        ),
        "defect_type": class_metrics(
            [r["truth_cls"] for r in abnormal_rows], [r["pred_cls"] for r in abnormal_rows], classes
        ),
    }

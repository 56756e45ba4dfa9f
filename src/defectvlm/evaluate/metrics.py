"""ROI- and image-level metrics from scores, with scikit-learn doing the arithmetic."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)


def best_threshold(truth: list[int], scores: list[float]) -> tuple[float, float]:
    """The threshold with the highest F1 on these scores (the validation split), and that F1."""
    if not any(truth):
        return 0.5, 0.0
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)[:-1]
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


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

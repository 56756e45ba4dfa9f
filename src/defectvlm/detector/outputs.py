"""What every detector backend writes and how it is measured, once for all (train.py's centernet,
ultralytics_backend.py): after a backend has written detector.onnx, `write_outputs` writes
detector.json, runs the ONNX detector on val at the proposal settings (timed) and writes
metrics.json (val mAP and recall at the budget, the backend's training figures, parity, speed).
detector.json and detector.onnx are named in loading.py, which inference opens."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from defectvlm.config import Params
from defectvlm.data.images import load_upright
from defectvlm.detector.data import truth_boxes
from defectvlm.detector.loading import CONFIG_FILE, ONNX_FILE
from defectvlm.detector.metrics import Box, detector_metrics
from defectvlm.detector.runtime import OnnxDetector
from defectvlm.errors import StepFailure
from defectvlm.io import write_json_atomic

WEIGHTS_FILE = "model.pt"
METRICS_FILE = "metrics.json"
ONNX_OPSET = 17


def write_outputs(
    params: Params,
    val_records: list[dict],
    classes: list[str],
    backend_keys: dict,
    training: dict,
    parity: Callable[[OnnxDetector], dict],
) -> dict:
    """detector.json (with the backend's `backend_keys`) and metrics.json (with its `training` figures and
    `parity`, torch vs the ONNX detector) for the detector.onnx in detector.output_dir; returns the metrics."""
    p = params.detector
    out = Path(p.output_dir)
    config = detector_config(params, classes, **backend_keys)
    write_json_atomic(out / CONFIG_FILE, config)
    detector = OnnxDetector(out / ONNX_FILE, threads=p.threads)
    if detector.classes != classes:
        raise StepFailure(f"{out / ONNX_FILE}: classes {detector.classes}, expected {classes}")
    val = detect_split(detector, val_records, config)
    metrics = {
        "val": detector_metrics(evaluation_pairs(val, val_records, params.regions.min_box_size), classes),
        **training,
        "onnx_parity": parity(detector),
        "onnx_images_per_second": images_per_second(val),
        "classes": classes,
        "threads": p.threads,
    }
    write_json_atomic(out / METRICS_FILE, metrics)
    return metrics


def detector_config(params: Params, classes: list[str], **backend_keys) -> dict:
    """detector.json: what inference needs (classes, input size, confidence, NMS, budget), with the
    backend's own keys after the input size."""
    p = params.detector
    return {
        "backend": p.backend,
        "classes": classes,
        "input_size": p.input_size,
        **backend_keys,
        "confidence": p.confidence,
        "nms_iou": p.nms_iou,
        "max_boxes": params.regions.max_boxes_per_image,
        "min_box_size": params.regions.min_box_size,
    }


def detect_split(detector: OnnxDetector, records: list[dict], config: dict) -> dict[str, tuple[list, float]]:
    """image id -> (detections at the proposal confidence and budget, seconds taken)."""
    found = {}
    for record in records:
        image = load_upright(record["path"])
        started = time.perf_counter()
        detections = detector.detect(image, config["confidence"], config["nms_iou"], config["max_boxes"])
        found[record["id"]] = (detections, time.perf_counter() - started)
    return found


def images_per_second(found: dict[str, tuple[list, float]]) -> float:
    """ONNX speed over detect_split's timings (letterbox, inference, decoding)."""
    return round(len(found) / max(sum(t for _, t in found.values()), 1e-9), 2)


def evaluation_pairs(found: dict, records: list[dict], min_box_size: float) -> list[tuple[list[Box], list[Box]]]:
    return [
        (
            [Box(d.xyxy, d.cls, d.score) for d in found[r["id"]][0]],
            [Box(b["xyxy"], b["cls"]) for b in truth_boxes(r, min_box_size)],
        )
        for r in records
    ]

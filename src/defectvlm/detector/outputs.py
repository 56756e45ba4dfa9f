"""What every detector backend writes and how it is measured: the output folder's other file
names (detector.json and detector.onnx are named in loading.py, which inference opens),
detector.json, and the val pass (the ONNX detector at the proposal settings, timed) whose boxes
give metrics.json's mAP and recall. train.py (centernet) and ultralytics_backend.py share it."""

from __future__ import annotations

import time

from defectvlm.config import Params
from defectvlm.data.images import load_upright
from defectvlm.detector.data import truth_boxes
from defectvlm.detector.metrics import Box
from defectvlm.detector.runtime import OnnxDetector

WEIGHTS_FILE = "model.pt"
METRICS_FILE = "metrics.json"
ONNX_OPSET = 17


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

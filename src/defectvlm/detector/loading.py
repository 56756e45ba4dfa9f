"""Find a proposal detector: a registry URI, a `train-detector` output folder, or an ONNX file
(ours or a factory's Ultralytics YOLO export), with the settings it proposes with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from defectvlm.config import Params
from defectvlm.detector.runtime import Detection, OnnxDetector
from defectvlm.errors import StepFailure

DETECTOR_SUFFIX = "-detector"
CONFIG_FILE = "detector.json"
ONNX_FILE = "detector.onnx"


@dataclass
class ProposalDetector:
    detector: OnnxDetector
    confidence: float
    nms_iou: float
    max_boxes: int
    name: str  # where it came from, for the predictions' `from`

    def propose(self, image) -> list[Detection]:
        return self.detector.detect(image, self.confidence, self.nms_iou, self.max_boxes)


def detector_model_name(params: Params) -> str:
    """The registry name of the detector that goes with `registry.model_name`."""
    return params.registry.model_name + DETECTOR_SUFFIX


def default_detector_uri(params: Params) -> str:
    return f"models:/{detector_model_name(params)}@candidate"


def open_detector(spec: str | None, params: Params, confidence: float | None = None) -> ProposalDetector:
    """`spec`: models:/<name>@<alias> or /<version>, a folder with detector.json, or a .onnx file;
    None: the registered `<registry.model_name>-detector@candidate`. Confidence, NMS and budget
    come from the folder's detector.json, else from params (detector.*, regions.max_boxes_per_image)."""
    spec = spec or default_detector_uri(params)
    if spec.startswith("models:/"):
        from defectvlm.inference.loading import resolve_registry

        path, _ = resolve_registry(spec, params.tracking.uri)
    else:
        path = Path(spec)
    settings = {
        "confidence": params.detector.confidence,
        "nms_iou": params.detector.nms_iou,
        "max_boxes": params.regions.max_boxes_per_image,
    }
    if path.is_dir():
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise StepFailure(
                f"--detector {spec}: a folder needs {CONFIG_FILE} and {ONNX_FILE} (train-detector output)"
            )
        config = json.loads(config_file.read_text(encoding="utf-8"))
        settings.update({k: config[k] for k in settings if k in config})
        path = path / ONNX_FILE
    elif path.suffix.lower() != ".onnx":
        raise StepFailure(f"--detector {spec}: expected models:/..., a train-detector folder or a .onnx file")
    if confidence is not None:
        settings["confidence"] = confidence
    return ProposalDetector(OnnxDetector(path, threads=params.detector.threads), name=spec, **settings)

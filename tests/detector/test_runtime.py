"""A factory's Ultralytics YOLO ONNX (and our export, same layout) run with onnxruntime only."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from defectvlm.detector.runtime import OnnxDetector
from defectvlm.errors import StepFailure
from tests.detector.yolo_graph import write_yolo_onnx

SIZE = 64
NAMES = {0: "scratch", 1: "dent"}
# input pixels (64 x 64 letterbox of a 128 x 64 image: scale 0.5, 16 grey rows on top)
CANDIDATES = [
    [20.0, 30.0, 8.0, 4.0, 0.90, 0.05],  # scratch
    [21.0, 30.0, 8.0, 4.0, 0.80, 0.10],  # the same scratch again: NMS removes it
    [40.0, 40.0, 10.0, 10.0, 0.10, 0.60],  # dent
    [50.0, 20.0, 6.0, 6.0, 0.02, 0.03],  # below any useful confidence
]


@pytest.fixture
def yolo(tmp_path):
    return write_yolo_onnx(tmp_path / "yolo.onnx", CANDIDATES, SIZE, NAMES)


def test_yolo_layout_is_decoded_into_image_pixels_without_ultralytics(yolo):
    detector = OnnxDetector(yolo)
    assert "ultralytics" not in sys.modules
    assert detector.classes == ["scratch", "dent"] and (detector.width, detector.height) == (SIZE, SIZE)
    found = detector.detect(Image.new("RGB", (128, 64)), confidence=0.05, nms_iou=0.5, max_boxes=8)
    assert [(d.cls, d.score) for d in found] == [("scratch", 0.9), ("dent", 0.6)]
    # back through the letterbox: x / 0.5, (y - 16) / 0.5
    assert found[0].xyxy == (32.0, 24.0, 48.0, 32.0)
    assert found[1].xyxy == (70.0, 38.0, 90.0, 58.0)


def test_confidence_and_budget(yolo):
    detector = OnnxDetector(yolo)
    image = Image.new("RGB", (128, 64))
    assert [d.cls for d in detector.detect(image, 0.7, 0.5, 8)] == ["scratch"]
    assert len(detector.detect(image, 0.01, 0.5, 8)) == 3
    assert len(detector.detect(image, 0.01, 0.5, 1)) == 1


def test_class_numbers_when_the_file_has_no_names(tmp_path):
    detector = OnnxDetector(write_yolo_onnx(tmp_path / "plain.onnx", CANDIDATES, SIZE, None))
    assert detector.classes == ["0", "1"]


def test_a_file_that_is_not_onnx_is_named(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(StepFailure, match="bad.onnx: not a loadable ONNX model"):
        OnnxDetector(bad)
    with pytest.raises(StepFailure, match="no such ONNX file"):
        OnnxDetector(tmp_path / "missing.onnx")

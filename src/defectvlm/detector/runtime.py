"""Running a proposal detector: letterbox in, `[1, 4 + nc, N]` out, boxes in image pixels.

One decoder for our own export and for a factory's Ultralytics-exported YOLO ONNX (same
layout: cx, cy, w, h in input pixels, then one score per class; no objectness). The ONNX
path needs onnxruntime only: no ultralytics import. Class names come from the file's
`names` metadata (Ultralytics writes it as a Python dict literal; our export does the same).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms

from defectvlm.errors import StepFailure

PAD_VALUE = 114  # Ultralytics' letterbox grey


@dataclass(frozen=True)
class Letterbox:
    scale: float
    left: int
    top: int


@dataclass(frozen=True)
class Detection:
    xyxy: tuple[float, float, float, float]  # pixels of the upright image
    score: float
    cls: str


def letterbox(image: Image.Image, width: int, height: int) -> tuple[np.ndarray, Letterbox]:
    """The image scaled to fit (aspect kept), centred on grey: uint8 [H, W, 3] and the mapping."""
    scale = min(width / image.width, height / image.height)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    left, top = round((width - new_w) / 2 - 0.1), round((height - new_h) / 2 - 0.1)
    canvas = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
    resized = image.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
    canvas[top : top + new_h, left : left + new_w] = np.asarray(resized)
    return canvas, Letterbox(scale, left, top)


def to_input(canvas: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [0, 1] (what the network and YOLO exports take)."""
    return (canvas.transpose(2, 0, 1)[None].astype(np.float32)) / 255.0


def decode(
    output: np.ndarray,
    box: Letterbox,
    width: int,
    height: int,
    classes: list[str],
    confidence: float,
    nms_iou: float,
    max_boxes: int,
) -> list[Detection]:
    """`[4 + nc, N]` -> at most max_boxes detections at or above confidence, best first,
    after per-class NMS, mapped back to the image and clipped to it."""
    if output.ndim != 2 or output.shape[0] != 4 + len(classes):
        raise StepFailure(f"detector output has shape {list(output.shape)}, expected [4 + {len(classes)}, N]")
    scores_all = output[4:]
    best = scores_all.argmax(axis=0)
    scores = scores_all[best, np.arange(scores_all.shape[1])]
    keep = np.nonzero(scores >= confidence)[0]
    if not len(keep):
        return []
    cx, cy, w, h = output[:4, keep]
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    xyxy = (xyxy - [box.left, box.top, box.left, box.top]) / box.scale
    xyxy = np.clip(xyxy, 0, [width, height, width, height])
    boxes_t, scores_t = torch.from_numpy(xyxy.astype(np.float32)), torch.from_numpy(scores[keep].astype(np.float32))
    kept = batched_nms(boxes_t, scores_t, torch.from_numpy(best[keep]), nms_iou)
    found = []
    for index in kept.tolist():
        x1, y1, x2, y2 = (round(float(v), 1) for v in xyxy[index])
        if x2 - x1 >= 1 and y2 - y1 >= 1:
            found.append(Detection((x1, y1, x2, y2), round(float(scores[keep][index]), 6), classes[best[keep][index]]))
        if len(found) == max_boxes:
            break
    return found


def onnx_class_names(metadata: dict[str, str], count: int) -> list[str]:
    """`names` metadata ({0: 'a', ...}) as a list; class numbers when the file has none."""
    text = metadata.get("names")
    if text:
        try:
            names = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            names = None
        if isinstance(names, dict) and len(names) == count:
            return [str(names[k]) for k in sorted(names)]
        if isinstance(names, list) and len(names) == count:
            return [str(n) for n in names]
    return [str(k) for k in range(count)]


class OnnxDetector:
    """An ONNX proposal detector (ours or an Ultralytics YOLO export) run with onnxruntime."""

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise StepFailure(f"{path}: no such ONNX file")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise StepFailure(f"{path}: not a loadable ONNX model ({exc})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(shape) != 4 or not all(isinstance(s, int) for s in shape[2:]):
            raise StepFailure(f"{path}: expected one image input [1, 3, H, W] with fixed H, W; got {shape}")
        out_shape = outputs[0].shape
        if len(out_shape) != 3 or not isinstance(out_shape[1], int) or out_shape[1] < 5:
            raise StepFailure(f"{path}: expected an output [1, 4 + classes, N] (Ultralytics layout); got {out_shape}")
        self.path = path
        self.input_name = inputs[0].name
        self.height, self.width = shape[2], shape[3]
        self.classes = onnx_class_names(self.session.get_modelmeta().custom_metadata_map, out_shape[1] - 4)

    def detect(self, image: Image.Image, confidence: float, nms_iou: float, max_boxes: int) -> list[Detection]:
        canvas, box = letterbox(image, self.width, self.height)
        (output,) = self.session.run(None, {self.input_name: to_input(canvas)})[:1]
        return decode(output[0], box, image.width, image.height, self.classes, confidence, nms_iou, max_boxes)

"""A tiny ONNX graph with an Ultralytics YOLO export's output layout, [1, 4 + nc, N]."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn


class FixedYolo(nn.Module):
    """Ignores the pixels' values (but uses them, so the input stays in the graph) and returns
    the given candidates: rows (cx, cy, w, h, score per class) in input pixels."""

    def __init__(self, candidates: list[list[float]]):
        super().__init__()
        self.register_buffer("table", torch.tensor(candidates, dtype=torch.float32).T.unsqueeze(0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table + images.mean() * 0.0


def write_yolo_onnx(path: Path, candidates: list[list[float]], size: int, names: dict | None) -> Path:
    buffer_path = path.with_suffix(".raw.onnx")
    torch.onnx.export(
        FixedYolo(candidates).eval(), (torch.zeros(1, 3, size, size),), str(buffer_path),
        input_names=["images"], output_names=["output0"], opset_version=17, dynamo=False,
    )  # fmt: skip
    model = onnx.load(str(buffer_path))
    if names is not None:  # Ultralytics writes str(dict)
        entry = model.metadata_props.add()
        entry.key, entry.value = "names", str(names)
    onnx.save(model, str(path))
    buffer_path.unlink()
    return path

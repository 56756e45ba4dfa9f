"""The default proposal detector: a small CNN with a CenterNet-style head, trained from scratch.

Why not torchvision's detection zoo: from random weights (no download, by rule) a Faster R-CNN /
SSDlite / RetinaNet needs far more than the 3-minute CPU budget to learn anything on ~100
abnormal images (measured in benchmarks/RESULTS.md), while a centre heatmap plus a box-size
regression at stride 4 learns the demo defects in that time and exports to ONNX as plain convs.

The network predicts, per stride-4 cell, a heatmap per class (a box's centre is a peak), the
box's width and height (log, in cells) and the centre's sub-cell offset. `ProposalHead` turns
that into the Ultralytics YOLO output layout, `[1, 4 + nc, N]` (cx, cy, w, h in input pixels,
then class scores), with non-peak cells zeroed, so our export and a factory's YOLO ONNX are
read by one decoder (detector/runtime.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STRIDE = 4
PEAK_TIE = 1e-5


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def cell_boxes(sides: torch.Tensor) -> torch.Tensor:
    """Per cell, log distances (in cells) from its centre to the four sides -> xyxy in input pixels."""
    _, _, rows, cols = sides.shape
    ys = (torch.arange(rows, dtype=sides.dtype).view(1, rows, 1) + 0.5) * STRIDE
    xs = (torch.arange(cols, dtype=sides.dtype).view(1, 1, cols) + 0.5) * STRIDE
    left, top, right, bottom = (torch.exp(sides.clamp(max=8.0)) * STRIDE).unbind(1)
    return torch.stack([xs - left, ys - top, xs + right, ys + bottom], dim=1)


class TinyCenterNet(nn.Module):
    """Backbone to stride 32, a top-down merge back to stride 4, two 1x1 heads on the merged map."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.stem = _conv(3, w, 2)  # /2
        self.down4 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # /4
        self.down8 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))  # /8
        self.down16 = nn.Sequential(_conv(4 * w, 6 * w, 2), _conv(6 * w, 6 * w))  # /16
        self.down32 = nn.Sequential(_conv(6 * w, 8 * w, 2), _conv(8 * w, 8 * w))  # /32: sees a whole streak
        self.lat4, self.lat8, self.lat16, self.top32 = (
            nn.Conv2d(2 * w, 2 * w, 1),
            nn.Conv2d(4 * w, 2 * w, 1),
            nn.Conv2d(6 * w, 2 * w, 1),
            nn.Conv2d(8 * w, 2 * w, 1),
        )
        self.fuse = _conv(2 * w, 2 * w)
        self.heatmap = nn.Conv2d(2 * w, num_classes, 1)
        self.sides = nn.Conv2d(2 * w, 4, 1)
        # a rare positive: start every cell near p = 0.01 so the focal loss is not swamped at step 0
        nn.init.constant_(self.heatmap.bias, -4.6)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: [B, 3, H, W] in [0, 1] -> (heatmap logits [B, nc, H/4, W/4], boxes [B, 4, H/4, W/4])."""
        x4 = self.down4(self.stem(images))
        x8 = self.down8(x4)
        x16 = self.down16(x8)
        p16 = self.lat16(x16) + F.interpolate(self.top32(self.down32(x16)), size=x16.shape[-2:], mode="nearest")
        p8 = self.lat8(x8) + F.interpolate(p16, size=x8.shape[-2:], mode="nearest")
        p4 = self.fuse(self.lat4(x4) + F.interpolate(p8, size=x4.shape[-2:], mode="nearest"))
        return self.heatmap(p4), cell_boxes(self.sides(p4))


class ProposalHead(nn.Module):
    """The trained network with its decoding in the graph: output [B, 4 + nc, H/4 * W/4]."""

    def __init__(self, net: TinyCenterNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, boxes = self.net(images)
        heat = torch.sigmoid(logits)
        # a cell within 1e-5 of its 3x3 maximum is a peak: an exact test flips on runtimes' rounding
        # of near-ties (torch vs onnxruntime); NMS removes the duplicate a tie leaves
        peaks = heat * (heat >= F.max_pool2d(heat, 3, stride=1, padding=1) - PEAK_TIE).to(heat.dtype)
        x1, y1, x2, y2 = boxes.unbind(1)
        centred = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=1)
        return torch.cat([centred, peaks], dim=1).flatten(2)

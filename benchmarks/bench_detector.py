"""CPU seconds per training step of the proposal detector against torchvision's detection models
trained from random weights (the choice in docs/cascade.md), one torch thread.

python benchmarks/bench_detector.py [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, ssdlite320_mobilenet_v3_large

from defectvlm.detector.data import targets
from defectvlm.detector.model import TinyCenterNet
from defectvlm.detector.train import detector_loss

BATCH = 8


def seconds_per_step(model, step, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), 0.01)
    step(model, optimizer)  # warm-up
    started = time.process_time()
    for _ in range(steps):
        step(model, optimizer)
    return (time.process_time() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    box = np.array([[10, 10, 200, 30]], dtype=np.float32)

    def torchvision_step(size: int):
        images = [torch.rand(3, size, size) for _ in range(BATCH)]
        wanted = [{"boxes": torch.from_numpy(box), "labels": torch.tensor([1])} for _ in range(BATCH)]

        def step(model, optimizer):
            model.train()
            loss = sum(model(images, wanted).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    crops = torch.rand(BATCH, 3, 256, 256)
    one = targets(box, np.zeros(1, np.int64), 4, 256)
    target = {k: torch.from_numpy(np.stack([v] * BATCH)) for k, v in one.items()}

    def centernet_step(model, optimizer):
        loss = detector_loss(model(crops), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    rows = [
        (
            "fasterrcnn_mobilenet_v3_large_fpn, 512 px",
            fasterrcnn_mobilenet_v3_large_fpn(
                weights=None, weights_backbone=None, num_classes=5, min_size=512, max_size=512
            ),
            torchvision_step(512),
        ),
        (
            "ssdlite320_mobilenet_v3_large, 320 px",
            ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5),
            torchvision_step(320),
        ),
        ("defectvlm centernet (width 16), 256 px crops", TinyCenterNet(4, 16), centernet_step),
    ]
    print(f"| model (batch {BATCH}) | parameters | CPU s / step |\n|---|---|---|")
    for name, model, step in rows:
        parameters = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {parameters:,} | {seconds_per_step(model, step, args.steps):.2f} |")


if __name__ == "__main__":
    main()

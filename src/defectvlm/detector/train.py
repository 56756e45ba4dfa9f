"""`train-detector`: the proposal detector, trained on the VLM's own train split, checked on val.

The test split is never read. Steps are fixed (not a time budget) and every draw comes from
generators seeded by `detector.seed`, on a fixed number of threads, so the same split and
parameters give the same weights. The output folder holds `model.pt` (state dict),
`detector.onnx` (what inference runs), `detector.json` (classes, input size, confidence, NMS,
budget) and `metrics.json` (val mAP@0.5, recall at the proposal budget, ONNX parity and speed).
`detector.backend: ultralytics` trains a YOLO model instead (ultralytics_backend.py, an optional
AGPL-3.0 extra) into the same files, evaluated by the same code below.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss

from defectvlm.config import DetectorParams, Params
from defectvlm.data.images import load_upright
from defectvlm.detector.data import batch, letterbox_records, truth_boxes
from defectvlm.detector.loading import ONNX_FILE
from defectvlm.detector.model import ProposalHead, TinyCenterNet
from defectvlm.detector.outputs import ONNX_OPSET, WEIGHTS_FILE, write_outputs
from defectvlm.detector.runtime import OnnxDetector, to_input
from defectvlm.errors import StepFailure
from defectvlm.io import read_splits, write_bytes_atomic

BOX_LOSS_WEIGHT = 2.0


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    positive = heat.eq(1).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos = (log_p * (1 - p) ** 2 * positive).sum()
    neg = (log_not_p * p**2 * (1 - heat) ** 4 * (1 - positive)).sum()
    return -(pos + neg) / positive.sum().clamp(min=1.0)


def detector_loss(outputs, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Focal loss on the heatmap + Gaussian-weighted GIoU loss of the boxes regressed around centres."""
    logits, boxes = outputs
    weight = target["weight"]
    cells = weight > 0
    predicted = boxes.permute(0, 2, 3, 1)[cells]
    wanted = target["box"].permute(0, 2, 3, 1)[cells]
    giou = generalized_box_iou_loss(predicted, wanted, reduction="none")
    box_loss = (giou * weight[cells]).sum() / weight[cells].sum().clamp(min=1e-6)
    return focal_loss(logits, target["heat"]) + BOX_LOSS_WEIGHT * box_loss


def split_classes(splits: dict[str, list[dict]], min_box_size: float) -> list[str]:
    classes = sorted({b["cls"] for rows in splits.values() for r in rows for b in truth_boxes(r, min_box_size)})
    if not classes:
        raise StepFailure("the train split has no label box to train a detector on")
    return classes


def fit(
    records: list[dict],
    classes: list[str],
    p: DetectorParams,
    min_box_size: float,
    log=print,
    name: str = "detector",
    steps: int | None = None,
) -> tuple[TinyCenterNet, list[float], float]:
    """Train a detector on `records` with `p`'s settings and seed for `steps` (default `p.steps`):
    (network in eval mode, losses, seconds). The one training loop: `train-detector` and the
    regions step's out-of-fold models both call it."""
    steps = p.steps if steps is None else steps
    torch.manual_seed(p.seed)
    torch.set_num_threads(p.threads)
    started = time.perf_counter()
    items = letterbox_records(records, classes, p.input_size, min_box_size)
    net = TinyCenterNet(len(classes), p.width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    rng = np.random.default_rng(p.seed)
    net.train()
    losses = []
    for step in range(steps):
        images, target = batch(items, p.crop_size, len(classes), rng, p.batch_size)
        loss = detector_loss(net(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"{name} step {step + 1}/{steps}: loss {np.mean(losses[-20:]):.4f}")
    net.eval()
    return net, losses, time.perf_counter() - started


def train_detector(params: Params, split_dir: Path, log=print) -> dict:
    """Train, export and check the detector; returns metrics.json's content."""
    p = params.detector
    min_box = params.regions.min_box_size
    splits = read_splits(split_dir, ("train", "val"))
    classes = split_classes(splits, min_box)
    if p.backend == "ultralytics":
        from defectvlm.detector.ultralytics_backend import train_ultralytics

        return train_ultralytics(params, splits, classes, log)
    net, losses, train_seconds = fit(splits["train"], classes, p, min_box, log)
    window = max(1, min(20, p.steps // 4))  # steps averaged for the first and the final loss

    out = Path(p.output_dir)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    write_bytes_atomic(out / WEIGHTS_FILE, buffer.getvalue())
    export_onnx(net, classes, p.input_size, out / ONNX_FILE)
    training = {
        "train_seconds": round(train_seconds, 1),
        "steps": p.steps,
        "first_loss": round(float(np.mean(losses[:window])), 4),
        "final_loss": round(float(np.mean(losses[-window:])), 4),
    }
    parity = partial(onnx_parity, net, records=splits["val"][:2], size=p.input_size)
    return write_outputs(params, splits["val"], classes, {"width": p.width}, training, parity)


def export_onnx(net: TinyCenterNet, classes: list[str], size: int, path: Path) -> None:
    """The network with its decoding, fixed input [1, 3, size, size], class names as metadata."""
    import onnx

    buffer = io.BytesIO()
    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():  # the TorchScript exporter: the dynamo one needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            ProposalHead(net).eval(), (dummy,), buffer, input_names=["images"], output_names=["output0"],
            opset_version=ONNX_OPSET, dynamo=False,
        )  # fmt: skip
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = "names", repr(dict(enumerate(classes)))
    write_bytes_atomic(path, model.SerializeToString())


def onnx_parity(net: TinyCenterNet, detector: OnnxDetector, records: list[dict], size: int) -> dict:
    """torch vs onnxruntime on a few val images: the largest |difference| / max(1, |torch|) (relative
    for box sizes in pixels, absolute for scores) over the scores both call a peak or not, and the share
    of class scores whose peak test flips (near-ties of the 3x3 maximum, rounded differently)."""
    from defectvlm.detector.runtime import letterbox

    worst, flips, cells = 0.0, 0, 0
    for record in records:
        canvas, _ = letterbox(load_upright(record["path"]), size, size)
        pixels = to_input(canvas)
        with torch.no_grad():
            expected = ProposalHead(net)(torch.from_numpy(pixels)).numpy()[0]
        got = detector.session.run(None, {detector.input_name: pixels})[0][0]
        same = np.ones_like(expected, dtype=bool)
        same[4:] = (expected[4:] > 0) == (got[4:] > 0)
        flips += int((~same[4:]).sum())
        cells += same[4:].size
        diff = np.abs(expected - got) / np.maximum(1.0, np.abs(expected))
        worst = max(worst, float(diff[same].max(initial=0.0)))
    return {"max_rel_diff": float(f"{worst:.3g}"), "peak_flip_share": round(flips / max(cells, 1), 6)}

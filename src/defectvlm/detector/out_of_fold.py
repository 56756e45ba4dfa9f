"""Out-of-fold detector predictions: the regions step's hard negatives (`regions.negatives_from:
detector | both`) without leakage.

Leakage rule: a training image's detector negatives come only from a detector that never
trained on it. A detector scoring the images it trained on finds few false positives, and not
the ones it makes on new images, so the VLM would learn to reject the wrong mistakes.

- **Folds**: the training split's groups (`split_group`, the split's grouping unit: parent
  folders by default) are shuffled by `regions.seed` and dealt in that order, each to the
  fold with the fewest images so far (ties: the lowest fold): the k folds hold about as many
  images each, and the same split + seed give the same folds.
- **Models**: fold model f trains on the other k-1 folds with `train-detector`'s training
  loop (`detector.fit`, the `detector.*` params and seed), for `regions.negatives_detector_steps`
  steps (0: `detector.steps`), and predicts the images of fold f: every training image is
  predicted by exactly one model, the one that did not see its group.
- **Val and test** images are predicted by one fold model each, chosen by a seeded hash of
  their group (no fold model trained on val or test): their regions are built the way the
  training ones are, so the VLM's val metric and threshold measure the task it is trained on.
- **Prediction** is inference's: letterbox, the exported graph's decoding (`ProposalHead`),
  `detector.confidence`, per-class NMS at `detector.nms_iou`, at most
  `regions.max_boxes_per_image` boxes best first (`runtime.decode`), run in torch on
  `detector.threads` threads (deterministic), not through ONNX.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from defectvlm.config import DetectorParams, RegionParams
from defectvlm.data.images import load_upright
from defectvlm.detector.model import ProposalHead
from defectvlm.detector.runtime import Detection, decode, letterbox, to_input
from defectvlm.detector.train import fit, split_classes
from defectvlm.errors import StepFailure
from defectvlm.seeding import item_rng, item_uniform


@dataclass(frozen=True)
class OutOfFold:
    folds: dict[str, int]  # training group -> its fold
    model_of: dict[str, int]  # image id (every split) -> the fold model that predicted it
    detections: dict[str, list[Detection]]  # image id -> that model's detections, best first
    classes: list[str]
    steps: int

    def summary(self, splits: dict[str, list[dict]]) -> dict:
        k = max(self.folds.values()) + 1
        images = Counter(self.model_of[r["id"]] for r in splits["train"])
        return {
            "folds": k,
            "steps_per_model": self.steps,
            "classes": self.classes,
            "train_images_per_fold": [images[f] for f in range(k)],
            "train_groups_per_fold": [sum(1 for v in self.folds.values() if v == f) for f in range(k)],
            "fold_of_train_group": dict(sorted(self.folds.items())),
        }


def assign_folds(records: list[dict], k: int, seed: int) -> dict[str, int]:
    """Training group -> fold in 0..k-1 (see the module doc)."""
    sizes = Counter(r["split_group"] for r in records)
    if len(sizes) < k:
        raise StepFailure(
            f"regions.negatives_folds is {k} but the training split has {len(sizes)} group(s): out-of-fold "
            "predictions need at least one group per fold; lower regions.negatives_folds or use negatives_from: random"
        )
    groups = sorted(sizes)
    item_rng(seed, "negatives_folds").shuffle(groups)
    load, folds = [0] * k, {}
    for group in groups:
        fold = min(range(k), key=lambda f: (load[f], f))
        folds[group] = fold
        load[fold] += sizes[group]
    return folds


def held_out_model(group: str, k: int, seed: int) -> int:
    """The fold model that predicts a val or test group (none of them trained on it)."""
    return min(int(item_uniform(seed, f"negatives_model\0{group}") * k), k - 1)


def predict_image(net, classes: list[str], p: DetectorParams, max_boxes: int, record: dict) -> list[Detection]:
    """One image through a fold model, decoded as inference decodes it (see the module doc)."""
    image = load_upright(record["path"])
    canvas, box = letterbox(image, p.input_size, p.input_size)
    with torch.no_grad():
        output = ProposalHead(net)(torch.from_numpy(to_input(canvas))).numpy()[0]
    return decode(output, box, image.width, image.height, classes, p.confidence, p.nms_iou, max_boxes)


def out_of_fold(splits: dict[str, list[dict]], regions: RegionParams, detector: DetectorParams, log=print) -> OutOfFold:
    """Train the k fold detectors and predict every image of every split with the one that did not see it."""
    train = splits["train"]
    k = regions.negatives_folds
    folds = assign_folds(train, k, regions.seed)
    classes = split_classes({"train": train}, regions.min_box_size)
    steps = regions.negatives_detector_steps or detector.steps
    predicted_by = {r["id"]: folds[r["split_group"]] for r in train}
    for name in ("val", "test"):
        predicted_by.update({r["id"]: held_out_model(r["split_group"], k, regions.seed) for r in splits[name]})
    everything = [r for name in ("train", "val", "test") for r in splits[name]]
    detections: dict[str, list[Detection]] = {}
    for fold in range(k):
        seen = [r for r in train if folds[r["split_group"]] != fold]
        log(f"out-of-fold detector {fold + 1}/{k}: training on {len(seen)} images ({steps} steps)")
        net, _, _ = fit(seen, classes, detector, regions.min_box_size, log, f"fold {fold + 1}/{k} detector", steps)
        for record in everything:
            if predicted_by[record["id"]] == fold:
                detections[record["id"]] = predict_image(net, classes, detector, regions.max_boxes_per_image, record)
    return OutOfFold(folds, predicted_by, detections, classes, steps)

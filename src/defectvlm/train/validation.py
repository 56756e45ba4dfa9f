"""Validation during training: evaluation loss and the scoring pass's metrics on val (ROI-F1,
defect-type accuracy, their mean), sharded over the ranks.

Every rank runs the same number of forwards, whatever the size of its share: a rank whose
share is shorter runs a filler batch and drops its result. Under ZeRO-3 each forward (and each
LM-head call) gathers the partitioned parameters from all ranks, so ranks that ran different
numbers of them would wait on each other forever.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from defectvlm.evaluate.metrics import best_threshold, class_metrics
from defectvlm.evaluate.scoring import score_samples
from defectvlm.train.data import IGNORE_INDEX, Collator, SftDataset


def validation_metrics(
    engine, processor, val_set: SftDataset, classes: list[str], batch_size: int, with_scoring: bool
) -> dict[str, float]:
    """{eval_loss[, roi_f1, type_accuracy, roi_f1_type]} on the whole validation split, the same
    on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    metrics = {"eval_loss": evaluation_loss(engine, val_set, Collator(processor), batch_size, rank, world)}
    if with_scoring:
        metrics.update(validation_scores(engine, processor, val_set, classes, rank, world))
    return metrics


@torch.no_grad()
def evaluation_loss(engine, val_set: SftDataset, collate: Collator, batch_size: int, rank: int, world: int) -> float:
    """Token-weighted mean loss over the answer tokens of the whole validation split."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    batches = [list(range(s, min(s + batch_size, len(val_set)))) for s in range(0, len(val_set), batch_size)]
    for k in range(math.ceil(len(batches) / world)):
        mine = k * world + rank
        batch = collate([val_set[i] for i in batches[mine if mine < len(batches) else 0]])
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = engine(**to_device(batch, engine)).loss
        if mine < len(batches):
            total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64)
    dist.all_reduce(total)
    engine.train()
    return float(total[0] / max(total[1], 1))


def validation_scores(
    engine, processor, val_set: SftDataset, classes: list[str], rank: int, world: int
) -> dict[str, float]:
    """The scoring pass on val (sharded over ranks): ROI-level F1 at its best threshold, the
    defect-type accuracy on the abnormal regions (the class the model gives each), and their mean
    (`roi_f1_type`: a checkpoint that finds the defects but cannot name them yet scores half)."""
    mine = score_samples(engine.module, processor, val_set.samples, classes, shard=(rank, world))
    everyone: list[list[dict] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    rows = [row for part in everyone for row in part]
    roi_f1 = best_threshold([int(r["truth"] == "abnormal") for r in rows], [r["score"] for r in rows])[1]
    typed = [r for r in rows if r["truth"] == "abnormal" and r.get("pred_cls")]
    types = class_metrics([r["truth_cls"] for r in typed], [r["pred_cls"] for r in typed], classes)
    type_accuracy = types["accuracy"] or 0.0  # None: no abnormal region in val
    return {"roi_f1": roi_f1, "type_accuracy": type_accuracy, "roi_f1_type": (roi_f1 + type_accuracy) / 2}


def to_device(batch: dict, engine) -> dict:
    """A collated batch on the engine's device, floating tensors in the model's dtype (from pinned
    memory, under CUDA, the copy overlaps with the work already queued)."""
    device = engine.device
    dtype = next(p.dtype for p in engine.module.parameters())
    moved = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if value.is_floating_point():
            value = value.to(dtype)
        moved[key] = value
    return moved

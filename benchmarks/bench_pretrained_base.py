"""Does the pretrained tiny base fine-tune better than the random one? (issue 17)

    python benchmarks/bench_pretrained_base.py [--steps 120] [--pretrained DIR] [--sft data/04_sft]

For each base (`tiny-random`, and the pretrained weights in DIR, default the package's): the
scoring pass on val and test before fine-tuning, then phase 1 of params.yaml (LoRA + projector,
its learning rates and LoRA rank) for `--steps` steps of a lean loop (AdamW, the recipe's
warm-up + cosine schedule, gradient clipping; no DeepSpeed, no checkpoints), then the same
scoring pass: threshold chosen on val, test ROI / image / defect-type metrics as `evaluate`
reports them. Also the image-label-copy baseline (each image's true label copied to its regions).
The whole image uses `--max-pixels` (small, for speed); the crops keep sft.crop_size.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from defectvlm.config import load_params
from defectvlm.evaluate.metrics import best_threshold, evaluate_rows
from defectvlm.evaluate.scoring import image_scores, score_samples
from defectvlm.io import read_jsonl
from defectvlm.models import tiny
from defectvlm.models.families import get_family
from defectvlm.train.data import Collator, SftDataset, batches
from defectvlm.train.loop import lr_lambda
from defectvlm.train.phases import apply_phase, param_groups


def label_copy(samples: list[dict]) -> dict:
    truth = [r["label"] == "abnormal" for s in samples for r in s["meta"]["regions"]]
    copied = [s["meta"]["label"] == "abnormal" for s in samples for r in s["meta"]["regions"]]
    return {
        "roi_precision": round(precision_score(truth, copied), 4),
        "roi_recall": round(recall_score(truth, copied), 4),
        "roi_f1": round(f1_score(truth, copied), 4),
        "roi_auroc": round(roc_auc_score(truth, copied), 4),
    }


def scored(model, processor, val: list[dict], test: list[dict], classes: list[str]) -> dict:
    model.eval()
    with torch.no_grad():
        val_rows = score_samples(model, processor, val, classes)
        threshold, val_f1 = best_threshold(
            [int(r["truth"] == "abnormal") for r in val_rows], [r["score"] for r in val_rows]
        )
        rows = score_samples(model, processor, test, classes)
    metrics = evaluate_rows(rows, image_scores(rows), threshold, classes)
    val_auroc = roc_auc_score([r["truth"] == "abnormal" for r in val_rows], [r["score"] for r in val_rows])
    return {
        "val_roi_auroc": round(val_auroc, 4),
        "val_best_roi_f1": round(val_f1, 4),
        "roi": {k: metrics["roi"][k] for k in ("precision", "recall", "f1", "auroc")},
        "image": {k: metrics["image"][k] for k in ("f1", "auroc")},
        "defect_type": {k: metrics["defect_type"][k] for k in ("accuracy", "per_class_accuracy")},
    }


def fine_tune(model, processor, train: list[dict], steps: int, seed: int) -> dict:
    params = load_params("params.yaml")
    family, phase = get_family(params.model.family), params.train.phase1
    torch.manual_seed(seed)
    model = apply_phase(model, family, phase, params.train.lora)
    groups = param_groups(model, family, phase)
    optimizer = torch.optim.AdamW(groups, weight_decay=params.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, params.train.warmup_ratio))
    dataset, collate = SftDataset(train, processor), Collator(processor)
    lengths, size = [item.length for item in dataset.items], params.train.batch_size
    epochs = math.ceil(steps * size / len(train)) + 1
    order = [b for epoch in range(epochs) for b in batches(lengths, size, seed, epoch, True)][:steps]
    model.train()
    start, losses = time.perf_counter(), []
    for index in order:
        loss = model(**collate([dataset[i] for i in index])).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], params.train.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model, {
        "steps": steps,
        "train_s": round(time.perf_counter() - start),
        "loss_last_20": round(sum(losses[-20:]) / 20, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, default=Path("data/04_sft"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--max-pixels", type=int, default=112 * 112)
    parser.add_argument("--pretrained", type=Path, default=None, help="folder of pretrain_tiny's files")
    parser.add_argument("--bases", default="random,pretrained")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    train, val, test = (read_jsonl(args.sft / f"{split}.jsonl") for split in ("train", "val", "test"))
    classes = json.loads((args.sft / "sft_summary.json").read_text(encoding="utf-8"))["classes"]
    report = {"label_copy_test": label_copy(test)}
    print(json.dumps(report), flush=True)
    min_pixels = load_params("params.yaml").model.min_pixels
    for base in args.bases.split(","):
        if base == "random":
            model, processor = tiny.build_tiny(min_pixels, args.max_pixels)
        else:
            model, processor = tiny.load_pretrained_tiny(min_pixels, args.max_pixels, folder=args.pretrained)
        before = scored(model, processor, val, test, classes)
        print(json.dumps({base: {"before": before}}), flush=True)
        model, run = fine_tune(model, processor, train, args.steps, args.seed)
        report[base] = {"before": before, "fine_tuned": scored(model, processor, val, test, classes), **run}
        print(json.dumps({base: report[base]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

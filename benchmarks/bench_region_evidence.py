"""Does the tiny model learn region-level evidence at all? Three measurements (issues 5, 17).

    make demo            # for data/04_sft
    python benchmarks/bench_region_evidence.py [--steps 160] [--sft data/04_sft]

1. **Image-only bound**: the test ROI-level AUROC and F1 of a predictor that knows only
   whether the *image* is abnormal and copies that to each of its regions. A model whose
   ROI metrics stay below this has learned nothing about regions.
2. **Single-region ablation**: every detect sample split into one sample per region (its
   line, its crop, its answer line), so no answer line has to find its own region among
   others. Phase 1 of the demo recipe (LoRA + projector, the demo's learning rate) trains
   `--steps` steps on it; test ROI AUROC is measured with the scoring pass.
3. **Same with an obvious crop**: identical, except each crop is replaced by a plain white
   (abnormal) or black (normal) square. If this is learned and (2) is not, the model can
   carry a crop's evidence to the answer, and what it lacks is features that make real
   defects stand out.

The base is `model.name_or_path` from params.yaml (`tiny`: the pretrained tiny base;
`tiny-random` gives the random one the issue-5 figures were measured with).
A lean loop (AdamW, the recipe's warm-up + cosine schedule, gradient clipping; no DeepSpeed, no checkpoints) so
that it runs in a few minutes; the whole image uses `--max-pixels` (small, for speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from defectvlm.config import load_params
from defectvlm.evaluate.scoring import score_samples
from defectvlm.io import read_jsonl
from defectvlm.models.families import get_family
from defectvlm.models.loading import load_base
from defectvlm.train.data import Collator, SftDataset, batches
from defectvlm.train.loop import lr_lambda
from defectvlm.train.phases import apply_phase, param_groups


def image_only_bound(samples: list[dict]) -> dict:
    truth = [r["label"] == "abnormal" for s in samples for r in s["meta"]["regions"]]
    copied = [s["meta"]["label"] == "abnormal" for s in samples for r in s["meta"]["regions"]]
    return {"roi_auroc": round(roc_auc_score(truth, copied), 3), "roi_f1": round(f1_score(truth, copied), 3)}


def single_region(samples: list[dict]) -> list[dict]:
    """One sample per region: the question, that region's line and crop, its answer line."""
    out = []
    for sample in samples:
        if sample["task"] != "detect":
            continue
        parts = sample["messages"][1]["content"]  # whole, question, (line, crop)*, closing
        lines = sample["messages"][2]["content"].split("\n")
        regions = sorted(sample["meta"]["regions"], key=lambda r: int(r["rid"][1:]))
        for k, region in enumerate(regions):
            item = copy.deepcopy(sample)
            line = {"type": "text", "text": parts[2 + 2 * k]["text"].lstrip("\n")}
            item["messages"][1]["content"] = [*parts[:2], line, parts[3 + 2 * k], parts[-1]]
            item["messages"][2]["content"] = next(a for a in lines if a.startswith(region["rid"] + ":"))
            item["meta"] = {**item["meta"], "regions": [region]}
            out.append(item)
    return out


def obvious_crops(samples: list[dict], folder: Path) -> list[dict]:
    paths = {}
    for name, value in (("abnormal", 255), ("normal", 0)):
        paths[name] = str(folder / f"{name}.png")
        Image.new("RGB", (64, 64), (value, value, value)).save(paths[name])
    out = copy.deepcopy(samples)
    for sample in out:
        crop = sample["messages"][1]["content"][3]
        crop["image"], crop["crop"] = paths[sample["meta"]["regions"][0]["label"]], [0, 0, 64, 64]
    return out


def train_and_score(train: list[dict], test: list[dict], classes: list[str], steps: int, max_pixels: int) -> dict:
    params = load_params("params.yaml")
    family = get_family(params.model.family)
    phase = params.train.phase1
    model, processor = load_base(params.model.model_copy(update={"max_pixels": max_pixels}))
    model = apply_phase(model, family, phase, params.train.lora)
    groups = param_groups(model, family, phase)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, params.train.warmup_ratio))
    dataset, collate = SftDataset(train, processor), Collator(processor)
    lengths = [item.length for item in dataset.items]
    order = [b for epoch in range(math.ceil(steps * 4 / len(train)) + 1) for b in batches(lengths, 4, 42, epoch, True)]
    start = time.perf_counter()
    model.train()
    for index in order[:steps]:
        loss = model(**collate([dataset[i] for i in index])).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], params.train.max_grad_norm)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    result = {"steps": steps, "train_s": round(seconds, 1), "last_loss": round(loss.item(), 3)}
    for name, samples in (("train", train[:200]), ("test", test)):
        rows = score_samples(model, processor, samples, classes)
        truth, scores = [r["truth"] == "abnormal" for r in rows], [r["score"] for r in rows]
        result[f"{name}_roi_auroc"] = round(roc_auc_score(truth, scores), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, default=Path("data/04_sft"))
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--max-pixels", type=int, default=112 * 112)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = read_jsonl(args.sft / "train.jsonl"), read_jsonl(args.sft / "test.jsonl")
    classes = json.loads((args.sft / "sft_summary.json").read_text(encoding="utf-8"))["classes"]
    report = {"image_only_bound_test": image_only_bound(test)}
    single_train, single_test = single_region(train), single_region(test)
    report["single_region_samples"] = {"train": len(single_train), "test": len(single_test)}
    report["single_region_real_crops"] = train_and_score(
        single_train, single_test, classes, args.steps, args.max_pixels
    )
    with tempfile.TemporaryDirectory() as folder:
        report["single_region_obvious_crops"] = train_and_score(
            obvious_crops(single_train, Path(folder)),
            obvious_crops(single_test, Path(folder)),
            classes,
            args.steps,
            args.max_pixels,
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

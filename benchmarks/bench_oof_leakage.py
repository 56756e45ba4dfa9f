"""Why detector negatives must be out of fold: the false positives per training image of a
detector that trained on those images (in-sample, the leak the regions step refuses) against
the out-of-fold figures of a `regions` run with negatives_from: detector | both.

python benchmarks/bench_oof_leakage.py --params P --split-dir data/02_split --regions data/03_regions

Trains one detector on the whole training split with the fold models' budget
(regions.negatives_detector_steps or detector.steps), predicts the training images with it
and counts them with the regions step's own IoU rule; prints both rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from defectvlm.config import load_params
from defectvlm.data.regions import detector_negatives
from defectvlm.detector.out_of_fold import predict_image
from defectvlm.detector.train import fit, split_classes
from defectvlm.io import read_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split-dir", default="data/02_split")
    parser.add_argument("--regions", default="data/03_regions", help="a regions output with detector negatives")
    args = parser.parse_args()
    params = load_params(args.params)
    p, r = params.detector, params.regions
    train = read_splits(Path(args.split_dir), ("train",))["train"]
    classes = split_classes({"train": train}, r.min_box_size)
    steps = r.negatives_detector_steps or p.steps
    started = time.process_time()
    net, _, _ = fit(train, classes, p, r.min_box_size, lambda _: None, "in-sample detector", steps)
    counts: Counter = Counter()
    for record in train:
        found = predict_image(net, classes, p, r.max_boxes_per_image, record)
        counts["detections"] += len(found)
        counts["false_positives"] += len(detector_negatives(found, record, r, counts))
    summary_file = Path(args.regions) / "regions_summary.json"
    oof = json.loads(summary_file.read_text(encoding="utf-8"))["splits"]["train"] if summary_file.exists() else {}
    images = len(train)
    rows = {
        "in_sample": {
            "false_positives_per_image": round(counts["false_positives"] / images, 3),
            "hits_per_image": round(counts["detector_hits"] / images, 3),
            "ambiguous_per_image": round(counts["detector_ambiguous"] / images, 3),
            "cpu_seconds": round(time.process_time() - started, 1),
        },
        "out_of_fold": oof
        and {
            "false_positives_per_image": round(
                (oof.get("detector_negatives", 0) + oof.get("detector_negatives_truncated", 0)) / images, 3
            ),
            "hits_per_image": round(oof.get("detector_hits", 0) / images, 3),
            "ambiguous_per_image": round(oof.get("detector_ambiguous", 0) / images, 3),
        },
        "steps": steps,
        "train_images": images,
    }
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

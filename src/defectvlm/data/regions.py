"""ROI candidates: each image's label boxes plus negatives (abnormal images) or decoys
(normal images) that look like defects in size and shape, so that "a region is listed"
never means "abnormal".

Negative and decoy sizes are drawn from the *training* positives (as fractions of their
image's width and height), and by default a normal image gets as many decoys as a random
training abnormal image has regions, so neither a region's size nor an image's region
count reveals the label; every draw for an image comes from a generator seeded by
(seed, image id), so the output does not depend on processing order. Region ids R1..Rk
follow a shuffled order. Each region keeps its pixel box (displayed frame) and its box in
the model family's native frame.

Hard negatives (`negatives_from: detector | both`): the false positives of out-of-fold
detectors (`defectvlm.detector.out_of_fold`: never a detector that trained on the image).
A detection is a false positive when its IoU with every label box of the image (any class,
any size, also those too small to be positives) is at most `neg_max_iou`, the rule random
negatives follow; one at IoU >= 0.5 with a label box (the cascade's match rule) is a hit,
one in between is ambiguous: neither becomes a region (counted). Mix and budget: positives
first (at most `max_boxes_per_image`), then the detector's false positives best score first
in the room left; `detector` stops there, `both` then draws random negatives (decoys on
normal images) until the image has as many negatives as `random` would give it.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass

from defectvlm.config import SPLITS, DetectorParams, ModelParams, RegionParams
from defectvlm.data.boxes import iou
from defectvlm.errors import StepFailure
from defectvlm.models.families import Family, get_family
from defectvlm.seeding import item_rng

PLACEMENT_ATTEMPTS = 50
NEGATIVE_MUTUAL_MAX_IOU = 0.5  # negatives may touch each other, not repeat each other
SIZE_JITTER = 0.15  # log-normal spread around a sampled positive's size
DETECTOR_HIT_IOU = 0.5  # a detection this close to a label box found it (detector.metrics.IOU_MATCH)


@dataclass(frozen=True)
class RegionsResult:
    splits: dict[str, list[dict]]
    summary: dict


def clean_positives(boxes: list[dict], params: RegionParams, counts: Counter) -> list[dict]:
    """Drop tiny boxes and merge same-class duplicates (IoU >= merge_iou), counting both."""
    kept: list[dict] = []
    for box in boxes:
        x1, y1, x2, y2 = box["xyxy"]
        if min(x2 - x1, y2 - y1) < params.min_box_size:
            counts["positives_too_small"] += 1
            continue
        if any(k["cls"] == box["cls"] and iou(k["xyxy"], box["xyxy"]) >= params.merge_iou for k in kept):
            counts["positives_merged"] += 1
            continue
        kept.append(box)
    return kept


def detector_negatives(detections: list, record: dict, params: RegionParams, counts: Counter) -> list[list[float]]:
    """The image's detector false positives (pixel boxes, best score first; rule in the module doc)."""
    truths = [b["xyxy"] for b in record["boxes"]]
    negatives = []
    for detection in sorted(detections, key=lambda d: -d.score):
        overlap = max((iou(list(detection.xyxy), t) for t in truths), default=0.0)
        if overlap >= DETECTOR_HIT_IOU:
            counts["detector_hits"] += 1
        elif overlap > params.neg_max_iou:
            counts["detector_ambiguous"] += 1
        else:
            negatives.append(list(detection.xyxy))
    return negatives


@dataclass(frozen=True)
class TrainPrior:
    """What negatives and decoys imitate, measured on the training split only."""

    shapes: list[tuple[float, float]]  # positives' (width, height) as fractions of their image, sorted
    abnormal_region_counts: list[int]  # regions per abnormal image (positives + negatives), sorted


def train_prior(train: list[dict], params: RegionParams) -> TrainPrior:
    # Sorted lists: draws index into them, so their order must not follow the input's.
    shapes, region_counts = [], []
    for r in train:
        positives = clean_positives(r["boxes"], params, Counter())
        shapes += [
            ((b["xyxy"][2] - b["xyxy"][0]) / r["width"], (b["xyxy"][3] - b["xyxy"][1]) / r["height"]) for b in positives
        ]
        if r["label"] == "abnormal" and positives:
            region_counts.append(min(len(positives) * (1 + params.abnormal_neg_per_pos), params.max_boxes_per_image))
    if not shapes:
        raise StepFailure("the training split has no positive box to draw negative and decoy sizes from")
    return TrainPrior(sorted(shapes), sorted(region_counts))


def _draw_box(
    rng: random.Random, shapes: list[tuple[float, float]], width: int, height: int, min_size: float
) -> list[float]:
    fw, fh = shapes[rng.randrange(len(shapes))]
    w = min(max(fw * math.exp(rng.gauss(0.0, SIZE_JITTER)) * width, min_size), width)
    h = min(max(fh * math.exp(rng.gauss(0.0, SIZE_JITTER)) * height, min_size), height)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    return [round(x1, 1), round(y1, 1), min(round(x1 + w, 1), float(width)), min(round(y1 + h, 1), float(height))]


def image_regions(
    record: dict,
    prior: TrainPrior,
    params: RegionParams,
    model: ModelParams,
    family: Family,
    counts: Counter,
    hard: list[list[float]] | None = None,
) -> dict:
    """The candidate regions of one image (see the module doc); `hard`: its detector false positives."""
    rng = item_rng(params.seed, record["id"])
    width, height = record["width"], record["height"]
    positives = clean_positives(record["boxes"], params, counts)
    if len(positives) > params.max_boxes_per_image:
        counts["positives_truncated"] += len(positives) - params.max_boxes_per_image
        positives = positives[: params.max_boxes_per_image]
    if record["label"] == "abnormal":
        wanted, source = params.abnormal_neg_per_pos * len(positives), "negative"
    elif params.decoy_count == "match_abnormal" and prior.abnormal_region_counts:
        # as many regions as a random training abnormal image has: the count says nothing of the label
        wanted, source = prior.abnormal_region_counts[rng.randrange(len(prior.abnormal_region_counts))], "decoy"
    else:
        wanted, source = params.normal_decoys_per_image, "decoy"
    room = params.max_boxes_per_image - len(positives)
    hard = hard or []
    if len(hard) > room:
        counts["detector_negatives_truncated"] += len(hard) - room
        hard = hard[:room]
    if params.negatives_from == "detector":
        wanted = 0
    else:  # random, or both: random draws fill up to the random count
        wanted = max(0, wanted - len(hard))
        room -= len(hard)
    if wanted > room:
        counts[f"{source}s_truncated"] += wanted - room
        wanted = room

    regions = [{"xyxy": list(b["xyxy"]), "label": "abnormal", "cls": b["cls"], "source": "positive"} for b in positives]
    regions += [{"xyxy": box, "label": "normal", "cls": None, "source": "detector"} for box in hard]
    placed: list[list[float]] = list(hard)
    for _ in range(wanted):
        for _attempt in range(PLACEMENT_ATTEMPTS):
            box = _draw_box(rng, prior.shapes, width, height, params.min_box_size)
            if all(iou(box, p["xyxy"]) <= params.neg_max_iou for p in positives) and all(
                iou(box, other) <= NEGATIVE_MUTUAL_MAX_IOU for other in placed
            ):
                placed.append(box)
                regions.append({"xyxy": box, "label": "normal", "cls": None, "source": source})
                break
        else:
            counts[f"{source}s_not_placed"] += 1

    rng.shuffle(regions)
    frame = family.frame(width, height, model.min_pixels, model.max_pixels)
    out = []
    for number, region in enumerate(regions, start=1):
        native = family.to_native(region["xyxy"], width, height, frame)
        out.append({"rid": f"R{number}", **region, "box": native})
        counts["detector_negatives" if region["source"] == "detector" else f"{region['source']}s"] += 1
    return {
        "id": record["id"],
        "path": record["path"],
        "blake3": record["blake3"],
        "width": width,
        "height": height,
        "label": record["label"],
        "split_group": record["split_group"],
        "family": family.name,
        "frame": list(frame),
        "regions": out,
    }


def build_regions(
    splits: dict[str, list[dict]],
    params: RegionParams,
    model: ModelParams,
    detector: DetectorParams | None = None,
    log=print,
) -> RegionsResult:
    """Every split's regions; `detector` (its params) is needed when negatives_from is detector or both."""
    family = get_family(model.family)
    prior = train_prior(splits["train"], params)
    result, summary = {}, {"family": family.name, "coords": family.coords, "splits": {}}
    found = {}
    summary["negatives"] = {"from": params.negatives_from}
    if params.negatives_from != "random":
        from defectvlm.detector.out_of_fold import out_of_fold

        if detector is None:
            raise StepFailure(f"regions.negatives_from: {params.negatives_from} needs the detector's params")
        oof = out_of_fold(splits, params, detector, log)
        found = oof.detections
        summary["negatives"].update(oof.summary(splits))
    for name in SPLITS:
        counts: Counter = Counter()
        rows = [
            image_regions(
                r,
                prior,
                params,
                model,
                family,
                counts,
                detector_negatives(found[r["id"]], r, params, counts) if found else None,
            )
            for r in splits[name]
        ]
        per_image = Counter((r["label"], len(r["regions"])) for r in rows)
        summary["splits"][name] = {
            "images": len(rows),
            **dict(sorted(counts.items())),
            "regions_per_image": {f"{label}:{k}": v for (label, k), v in sorted(per_image.items())},
        }
        result[name] = rows
    summary["train_positive_shapes"] = {
        "count": len(prior.shapes),
        "median_width_fraction": round(statistics.median(w for w, _ in prior.shapes), 4),
        "median_height_fraction": round(statistics.median(h for _, h in prior.shapes), 4),
    }
    return RegionsResult(result, summary)

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

Misplaced boxes (`misplaced_per_pos`, training split only): per positive, boxes cut from it (a
fifth to a half of it along one side) or shifted off it (by half to four fifths of its length),
whose IoU with it lies in (neg_max_iou, misplaced_max_iou], labelled normal. They look like the
detector's usual false alarm, a box around part of a defect, and teach the VLM that such a
region is not a finding. Val and test keep the regions they always had (the cascade evaluation
measures the rejection on the detector's own proposals); a training normal image's decoy count
is drawn from the training abnormal images' counts with these boxes included.
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
    train_region_counts: list[int]  # the same with the training split's misplaced boxes, sorted


def train_prior(train: list[dict], params: RegionParams) -> TrainPrior:
    # Sorted lists: draws index into them, so their order must not follow the input's.
    shapes, region_counts, train_counts = [], [], []
    for r in train:
        positives = clean_positives(r["boxes"], params, Counter())
        shapes += [
            ((b["xyxy"][2] - b["xyxy"][0]) / r["width"], (b["xyxy"][3] - b["xyxy"][1]) / r["height"]) for b in positives
        ]
        if r["label"] == "abnormal" and positives:
            per_positive = 1 + params.abnormal_neg_per_pos
            region_counts.append(min(len(positives) * per_positive, params.max_boxes_per_image))
            with_misplaced = len(positives) * (per_positive + params.misplaced_per_pos)
            train_counts.append(min(with_misplaced, params.max_boxes_per_image))
    if not shapes:
        raise StepFailure("the training split has no positive box to draw negative and decoy sizes from")
    return TrainPrior(sorted(shapes), sorted(region_counts), sorted(train_counts))


def _draw_box(
    rng: random.Random, shapes: list[tuple[float, float]], width: int, height: int, min_size: float
) -> list[float]:
    fw, fh = shapes[rng.randrange(len(shapes))]
    w = min(max(fw * math.exp(rng.gauss(0.0, SIZE_JITTER)) * width, min_size), width)
    h = min(max(fh * math.exp(rng.gauss(0.0, SIZE_JITTER)) * height, min_size), height)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    return [round(x1, 1), round(y1, 1), min(round(x1 + w, 1), float(width)), min(round(y1 + h, 1), float(height))]


def _misplaced_box(rng: random.Random, box: list[float], width: int, height: int, min_size: float) -> list[float]:
    """A box cut from `box` or shifted off it along one axis (the long one three times in four)."""
    x1, y1, x2, y2 = box
    long_x = (x2 - x1) >= (y2 - y1)
    along_x = long_x if rng.random() < 0.75 else not long_x
    lo, hi = (x1, x2) if along_x else (y1, y2)
    span = hi - lo
    if rng.random() < 0.5:  # cut: keep a part at one end
        keep = span * rng.uniform(0.2, 0.5)
        lo, hi = (lo, lo + keep) if rng.random() < 0.5 else (hi - keep, hi)
    else:  # shift off the defect, forwards or backwards
        shift = span * rng.uniform(0.5, 0.8) * rng.choice((-1, 1))
        lo, hi = lo + shift, hi + shift
    out = [lo, y1, hi, y2] if along_x else [x1, lo, x2, hi]
    pad = rng.uniform(-0.1, 0.1)  # the other axis a little looser or tighter
    a, b = (1, 3) if along_x else (0, 2)
    grow = (out[b] - out[a]) * pad
    out[a], out[b] = out[a] - grow, out[b] + grow
    x1, y1, x2, y2 = max(0.0, out[0]), max(0.0, out[1]), min(float(width), out[2]), min(float(height), out[3])
    if x2 - x1 < min_size or y2 - y1 < min_size:
        return []
    return [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)]


def misplaced_boxes(
    rng: random.Random, positives: list[dict], per_positive: int, room: int, params: RegionParams, size: tuple[int, int]
) -> list[list[float]]:
    """Up to `per_positive` misplaced boxes per positive (module doc), at most `room` in all."""
    boxes: list[list[float]] = []
    for positive in positives:
        for _ in range(per_positive):
            for _attempt in range(PLACEMENT_ATTEMPTS):
                box = _misplaced_box(rng, positive["xyxy"], *size, params.min_box_size)
                if (
                    box
                    and params.neg_max_iou < iou(box, positive["xyxy"]) <= params.misplaced_max_iou
                    and all(iou(box, p["xyxy"]) <= params.misplaced_max_iou for p in positives)
                    and all(iou(box, other) <= NEGATIVE_MUTUAL_MAX_IOU for other in boxes)
                ):
                    boxes.append(box)
                    break
    return boxes[:room]


def image_regions(
    record: dict,
    prior: TrainPrior,
    params: RegionParams,
    model: ModelParams,
    family: Family,
    counts: Counter,
    hard: list[list[float]] | None = None,
    train: bool = False,
) -> dict:
    """The candidate regions of one image (see the module doc); `hard`: its detector false positives;
    `train`: the image is in the training split (misplaced boxes)."""
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
        pool = prior.train_region_counts if train else prior.abnormal_region_counts
        wanted, source = pool[rng.randrange(len(pool))], "decoy"
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
    if train and params.misplaced_per_pos and record["label"] == "abnormal":
        room = params.max_boxes_per_image - len(regions)
        wanted = params.misplaced_per_pos * len(positives)
        misplaced = misplaced_boxes(rng, positives, params.misplaced_per_pos, room, params, (width, height))
        shortfall = {"misplaced_not_placed": min(wanted, room) - len(misplaced), "misplaced_truncated": wanted - room}
        for key, missing in shortfall.items():
            if missing > 0:
                counts[key] += missing
        regions += [{"xyxy": box, "label": "normal", "cls": None, "source": "misplaced"} for box in misplaced]

    rng.shuffle(regions)
    frame = family.frame(width, height, model.min_pixels, model.max_pixels)
    out = []
    for number, region in enumerate(regions, start=1):
        native = family.to_native(region["xyxy"], width, height, frame)
        out.append({"rid": f"R{number}", **region, "box": native})
        source = region["source"]
        counts[{"detector": "detector_negatives", "misplaced": "misplaced"}.get(source, f"{source}s")] += 1
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
                train=name == "train",
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

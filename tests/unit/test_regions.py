import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2VLImageProcessor

from defectvlm.config import ModelParams, RegionParams
from defectvlm.data.regions import build_regions, clean_positives, image_regions, iou, train_prior
from defectvlm.models.families import FAMILIES, get_family


def record(i: int, label: str, boxes: list[list[float]], width=800, height=600, cls="slag") -> dict:
    return {
        "id": f"{label}/g/{i}.jpg",
        "path": f"x/{i}.jpg",
        "blake3": f"{i:064x}",
        "width": width,
        "height": height,
        "label": label,
        "boxes": [{"xyxy": b, "cls": cls} for b in boxes],
        "split_group": "g",
    }


def splits_of(records: list[dict]) -> dict[str, list[dict]]:
    return {"train": records, "val": [], "test": []}


box_strategy = st.tuples(st.floats(0, 700), st.floats(0, 500), st.floats(10, 200), st.floats(10, 200)).map(
    lambda t: [t[0], t[1], min(t[0] + t[2], 800.0), min(t[1] + t[3], 600.0)]
)


@settings(max_examples=80, deadline=None)
@given(boxes=st.lists(box_strategy, min_size=1, max_size=5), neg_max_iou=st.sampled_from([0.0, 0.1, 0.3]))
def test_property_negatives_never_overlap_positives_beyond_the_limit(boxes, neg_max_iou):
    params = RegionParams(neg_max_iou=neg_max_iou, abnormal_neg_per_pos=2, max_boxes_per_image=20, merge_iou=1.0)
    result = build_regions(splits_of([record(0, "abnormal", boxes)]), params, ModelParams())
    regions = result.splits["train"][0]["regions"]
    positives = [r["xyxy"] for r in regions if r["source"] == "positive"]
    for region in regions:
        if region["source"] == "negative":
            assert all(iou(region["xyxy"], p) <= neg_max_iou + 1e-9 for p in positives)
            x1, y1, x2, y2 = region["xyxy"]
            assert 0 <= x1 < x2 <= 800 and 0 <= y1 < y2 <= 600


@settings(max_examples=200, deadline=None)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    width=st.integers(64, 4000),
    height=st.integers(64, 4000),
    fractions=st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.01, 0.1), st.floats(0.01, 0.1)),
)
def test_property_native_boxes_map_back_within_half_a_native_unit(family, width, height, fractions):
    fam = get_family(family)
    fx, fy, fw, fh = fractions
    box = [fx * width, fy * height, (fx + fw) * width, (fy + fh) * height]
    frame = fam.frame(width, height, 3136, 1003520)
    native = fam.to_native(box, width, height, frame)
    back = fam.from_native(native, width, height, frame)
    frame_w, frame_h = frame
    # Rounding to integers costs at most half a native unit; where the frame is at least as
    # fine as the image (unit <= 2 px) that is within 1 px of the original box.
    tolerance = [0.5 * width / frame_w, 0.5 * height / frame_h] * 2
    assert all(abs(b - o) <= t + 1e-6 for b, o, t in zip(back, box, tolerance, strict=True))
    if width / frame_w <= 2 and height / frame_h <= 2:
        assert all(abs(b - o) <= 1 + 1e-6 for b, o in zip(back, box, strict=True))


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(40, 2600),
    height=st.integers(40, 2600),
    budget=st.sampled_from([(3136, 200704), (3136, 1003520), (200704, 401408)]),
)
def test_qwen2_5_vl_frame_matches_the_processor_itself(width, height, budget):
    if max(width, height) / min(width, height) > 150:
        return  # smart_resize refuses aspect ratios above 200
    processor = Qwen2VLImageProcessor(min_pixels=budget[0], max_pixels=budget[1])
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    _, grid_h, grid_w = processor(images=[pixels], return_tensors="np")["image_grid_thw"][0]
    family = get_family("qwen2_5_vl")
    assert family.resized(width, height, *budget) == (grid_w * family.patch_size, grid_h * family.patch_size)


def test_decoy_sizes_follow_the_training_positives():
    train = [record(i, "abnormal", [[100, 100, 180, 130]]) for i in range(10)]  # 10% x 5% of the image
    train += [record(100 + i, "normal", []) for i in range(20)]
    params = RegionParams(decoy_count="fixed", normal_decoys_per_image=4)
    result = build_regions(splits_of(train), params, ModelParams())
    decoys = [r for img in result.splits["train"] for r in img["regions"] if r["source"] == "decoy"]
    assert len(decoys) == 80
    widths = np.array([(r["xyxy"][2] - r["xyxy"][0]) / 800 for r in decoys])
    heights = np.array([(r["xyxy"][3] - r["xyxy"][1]) / 600 for r in decoys])
    assert np.median(widths) == pytest.approx(0.1, rel=0.1) and np.median(heights) == pytest.approx(0.05, rel=0.1)
    assert widths.max() < 0.1 * np.exp(5 * 0.15) and widths.min() > 0.1 * np.exp(-5 * 0.15)


def test_output_identical_whatever_the_processing_order():
    rng = random.Random(1)
    train = [record(i, "abnormal", [[rng.uniform(0, 600), 50, 700, 120]]) for i in range(15)]
    train += [record(100 + i, "normal", []) for i in range(15)]
    shuffled = train[:]
    rng.shuffle(shuffled)
    a = build_regions(splits_of(train), RegionParams(), ModelParams()).splits["train"]
    b = build_regions(splits_of(shuffled), RegionParams(), ModelParams()).splits["train"]
    assert sorted(a, key=lambda r: r["id"]) == sorted(b, key=lambda r: r["id"])


def test_truncation_keeps_positives_first_and_is_counted():
    boxes = [[10 + 60 * i, 10, 50 + 60 * i, 50] for i in range(6)]
    params = RegionParams(max_boxes_per_image=4, abnormal_neg_per_pos=1)
    prior = train_prior([record(0, "abnormal", boxes)], params)
    counts = Counter()
    out = image_regions(record(0, "abnormal", boxes), prior, params, ModelParams(), get_family("qwen2_5_vl"), counts)
    assert [r["source"] for r in out["regions"]] == ["positive"] * 4
    assert counts["positives_truncated"] == 2 and counts["negatives_truncated"] == 4  # 1 per kept positive
    assert sorted(r["rid"] for r in out["regions"]) == ["R1", "R2", "R3", "R4"]


def test_tiny_and_duplicate_positives_are_filtered_and_counted():
    counts = Counter()
    boxes = [
        {"xyxy": [0, 0, 40, 40], "cls": "slag"},
        {"xyxy": [0, 0, 40, 41], "cls": "slag"},  # duplicate
        {"xyxy": [0, 0, 40, 41], "cls": "streak"},  # another class: kept
        {"xyxy": [100, 100, 104, 140], "cls": "slag"},  # 4 px wide: tiny
    ]
    kept = clean_positives(boxes, RegionParams(min_box_size=8, merge_iou=0.9), counts)
    assert [b["cls"] for b in kept] == ["slag", "streak"]
    assert counts == {"positives_merged": 1, "positives_too_small": 1}


def test_region_count_does_not_reveal_the_label():
    rng = random.Random(3)
    train = [
        record(i, "abnormal", [[50 + 150 * k, 50, 120 + 150 * k, 90] for k in range(rng.randint(1, 4))])
        for i in range(200)
    ]
    train += [record(1000 + i, "normal", []) for i in range(200)]
    rows = build_regions(splits_of(train), RegionParams(), ModelParams()).splits["train"]
    by_label = {
        label: Counter(len(r["regions"]) for r in rows if r["label"] == label) for label in ("abnormal", "normal")
    }
    assert set(by_label["abnormal"]) == set(by_label["normal"]) == {2, 4, 6, 8}
    for k in (2, 4, 6, 8):
        assert abs(by_label["abnormal"][k] - by_label["normal"][k]) < 40  # same distribution up to sampling noise


def test_misplaced_boxes_cover_part_of_a_defect_in_training_only():
    rng = random.Random(5)
    records = [record(i, "abnormal", [[rng.uniform(0, 500), 200, 700, 260]]) for i in range(30)]
    records += [record(100 + i, "normal", []) for i in range(30)]
    params = RegionParams(misplaced_per_pos=2, misplaced_max_iou=0.4)
    result = build_regions({"train": records, "val": records, "test": []}, params, ModelParams())
    train, val = result.splits["train"], result.splits["val"]
    for image in train:
        positives = [r["xyxy"] for r in image["regions"] if r["source"] == "positive"]
        for region in image["regions"]:
            if region["source"] == "misplaced":
                assert region["label"] == "normal" and region["cls"] is None
                assert 0.1 < max(iou(region["xyxy"], p) for p in positives) <= 0.4 + 1e-9
    placed = sum(r["source"] == "misplaced" for image in train for r in image["regions"])
    assert placed == result.summary["splits"]["train"]["misplaced"] == 60  # two per positive
    assert not any(r["source"] == "misplaced" for image in val for r in image["regions"])
    # a training normal image gets as many decoys as a training abnormal image has regions
    counts = {
        label: sorted({len(i["regions"]) for i in train if i["label"] == label}) for label in ("abnormal", "normal")
    }
    assert counts["abnormal"] == counts["normal"] == [4]
    assert {len(i["regions"]) for i in val if i["label"] == "normal"} == {2}


def test_without_misplaced_boxes_the_regions_are_unchanged():
    rng = random.Random(6)
    records = [record(i, "abnormal", [[rng.uniform(0, 500), 200, 700, 260]]) for i in range(10)]
    off = build_regions(splits_of(records), RegionParams(), ModelParams()).splits["train"]
    on = build_regions(splits_of(records), RegionParams(misplaced_per_pos=1), ModelParams()).splits["train"]
    for a, b in zip(off, on, strict=True):
        kept = [r["xyxy"] for r in b["regions"] if r["source"] != "misplaced"]
        assert sorted(r["xyxy"] for r in a["regions"]) == sorted(kept)


def test_misplaced_limit_must_lie_between_negatives_and_a_match():
    with pytest.raises(ValueError, match="misplaced_max_iou"):
        RegionParams(misplaced_per_pos=1, misplaced_max_iou=0.5)

"""Hard negatives from out-of-fold detectors (regions.negatives_from: detector | both)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from defectvlm.config import DetectorParams, ModelParams, RegionParams
from defectvlm.data.regions import build_regions, iou
from defectvlm.detector import out_of_fold as oof
from defectvlm.detector.runtime import Detection
from defectvlm.errors import StepFailure
from defectvlm.io import read_jsonl, read_splits
from tests.conftest import read_json, run_cli, write_params
from tests.detector.conftest import TINY


@pytest.fixture(scope="module")
def splits(sft_dir) -> dict[str, list[dict]]:
    return read_splits(sft_dir.parent / "02", ("train", "val", "test"))


def test_folds_are_seeded_balanced_and_whole_groups(splits):
    train = splits["train"]
    folds = oof.assign_folds(train, 3, seed=7)
    assert folds == oof.assign_folds(list(reversed(train)), 3, seed=7)  # not the records' order
    assert set(folds) == {r["split_group"] for r in train} and set(folds.values()) == {0, 1, 2}
    sizes = Counter(folds[r["split_group"]] for r in train)
    largest_group = max(Counter(r["split_group"] for r in train).values())
    assert max(sizes.values()) - min(sizes.values()) <= largest_group
    assert any(oof.assign_folds(train, 3, seed=s) != folds for s in range(8, 12))  # the seed decides


def test_fewer_groups_than_folds_is_a_clear_error(splits):
    groups = len({r["split_group"] for r in splits["train"]})
    with pytest.raises(StepFailure, match=f"negatives_folds is {groups + 1} but the training split has {groups}"):
        oof.assign_folds(splits["train"], groups + 1, seed=0)


def test_no_image_is_predicted_by_a_detector_that_trained_on_its_group(splits, monkeypatch):
    trained_on: dict[int, set[str]] = {}  # model (its fit call) -> ids of the records it trained on
    predicted: dict[str, list[int]] = {}  # image id -> models that predicted it

    def fake_fit(records, classes, p, min_box, log, name, steps):
        model = len(trained_on)
        trained_on[model] = {r["id"] for r in records}
        return model, [], 0.0

    def fake_detect(net, classes, p, max_boxes, record):
        predicted.setdefault(record["id"], []).append(net)
        return []

    monkeypatch.setattr(oof, "fit", fake_fit)
    monkeypatch.setattr(oof, "predict_image", fake_detect)
    result = oof.out_of_fold(splits, RegionParams(negatives_from="both", negatives_folds=3), DetectorParams())
    assert len(trained_on) == 3
    group_of = {r["id"]: r["split_group"] for rows in splits.values() for r in rows}
    evaluated = {r["id"] for name in ("val", "test") for r in splits[name]}
    for image, models in predicted.items():
        assert len(models) == 1, f"{image} predicted by {len(models)} models"
        (model,) = models
        seen_groups = {group_of[i] for i in trained_on[model]}
        assert image not in trained_on[model] and group_of[image] not in seen_groups
        assert model == result.model_of[image]
    assert set(predicted) == set(group_of)  # every image of every split, once
    for model, ids in trained_on.items():  # each model: exactly the training groups of the other folds
        assert not ids & evaluated
        assert {group_of[i] for i in ids} == {g for g, f in result.folds.items() if f != model}


def _image(boxes: list[list[float]], label: str = "abnormal") -> dict:
    return {
        "id": f"{label}/g/0.jpg",
        "path": "x/0.jpg",
        "blake3": "0" * 64,
        "width": 800,
        "height": 600,
        "label": label,
        "boxes": [{"xyxy": b, "cls": "slag"} for b in boxes],
        "split_group": "g",
    }


def _run(params: RegionParams, record: dict, detections: list[Detection], monkeypatch) -> tuple[dict, dict]:
    def fake_out_of_fold(splits, regions, detector, log):
        return oof.OutOfFold({"g": 0, "h": 1}, {record["id"]: 0}, {record["id"]: detections}, ["slag"], 1)

    monkeypatch.setattr(oof, "out_of_fold", fake_out_of_fold)
    result = build_regions({"train": [record], "val": [], "test": []}, params, ModelParams(), DetectorParams())
    return result.splits["train"][0], result.summary["splits"]["train"]


def _detection(xyxy, score) -> Detection:
    return Detection(tuple(xyxy), score, "slag")


def test_iou_rule_keeps_clear_false_positives_only(monkeypatch):
    truth = [100.0, 100.0, 200.0, 200.0]
    detections = [
        _detection([100, 100, 200, 210], 0.9),  # a hit (IoU 0.91): the label box is already a positive
        _detection([150, 100, 250, 200], 0.8),  # ambiguous (IoU 0.33): neither
        _detection([400, 300, 500, 400], 0.3),  # false positives (IoU 0), best score first
        _detection([600, 100, 700, 200], 0.7),
        _detection([4, 4, 12, 12], 0.6),  # IoU 0.25 with the too-small label box: ambiguous too
        _detection([700, 400, 780, 480], 0.1),  # a false positive past the budget
    ]
    params = RegionParams(negatives_from="detector", negatives_folds=2, max_boxes_per_image=3)
    row, counts = _run(params, _image([truth, [5.0, 5.0, 9.0, 9.0]]), detections, monkeypatch)
    hard = [r["xyxy"] for r in row["regions"] if r["source"] == "detector"]
    # budget 3: one positive (the 4-pixel box is too small to be one, yet a detection over it is no
    # "normal" region), then the two best of the three false positives
    assert sorted(hard) == sorted([[600, 100, 700, 200], [400, 300, 500, 400]])
    assert all(r["label"] == "normal" for r in row["regions"] if r["source"] == "detector")
    assert {r["source"] for r in row["regions"]} == {"positive", "detector"}  # detector: no random draws
    assert counts["detector_hits"] == 1 and counts["detector_ambiguous"] == 2
    assert counts["detector_negatives"] == 2 and counts["detector_negatives_truncated"] == 1


@pytest.mark.parametrize(("found", "detector", "random"), [(0, 0, 2), (1, 1, 1), (3, 3, 0), (9, 6, 0)])
def test_both_fills_with_random_draws_up_to_the_random_count_within_the_budget(found, detector, random, monkeypatch):
    boxes = [[10.0 + 60 * i, 500.0, 50.0 + 60 * i, 540.0] for i in range(found)]
    params = RegionParams(negatives_from="both", negatives_folds=2, abnormal_neg_per_pos=1, max_boxes_per_image=8)
    image = _image([[100.0, 100.0, 200.0, 200.0], [300.0, 100.0, 400.0, 200.0]])  # 2 positives: random gives 2
    row, counts = _run(params, image, [_detection(b, 0.5) for b in boxes], monkeypatch)
    sources = Counter(r["source"] for r in row["regions"])
    assert (sources["positive"], sources["detector"], sources["negative"]) == (2, detector, random)
    assert counts.get("detector_negatives_truncated", 0) == found - detector
    hard = [r["xyxy"] for r in row["regions"] if r["source"] == "detector"]
    for region in row["regions"]:
        if region["source"] == "negative":  # random draws do not repeat the detector's boxes
            assert all(iou(region["xyxy"], h) <= 0.5 for h in hard)


def test_regions_step_end_to_end_is_deterministic_and_uses_detector_negatives(sft_dir, tmp_path):
    split = sft_dir.parent / "02"
    tiny = {**TINY, "input_size": 64, "crop_size": 32, "width": 4, "steps": 6}
    sections = {"regions": {"negatives_from": "both", "negatives_folds": 2, "negatives_detector_steps": 4}}
    params = write_params(tmp_path / "params.yaml", {"detector": tiny, **sections})
    outputs = []
    for run in ("a", "b"):
        assert run_cli("regions", "--params", params, "--in", split, "--out", tmp_path / run) == 0
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    assert outputs[0] == outputs[1]  # byte-identical: folds, fold models and their detections are seeded
    summary = read_json(tmp_path / "a" / "regions_summary.json")
    assert summary["negatives"]["folds"] == 2 and summary["negatives"]["steps_per_model"] == 4
    for name in ("train", "val", "test"):
        assert summary["splits"][name]["detector_negatives"] > 0, name
        rows = read_jsonl(tmp_path / "a" / f"{name}.jsonl")
        hard = [(row, r) for row in rows for r in row["regions"] if r["source"] == "detector"]
        assert len(hard) == summary["splits"][name]["detector_negatives"]
        for row, region in hard:
            assert region["label"] == "normal" and region["cls"] is None
            assert all(iou(region["xyxy"], b["xyxy"]) <= 0.1 for b in _truths(split, name, row["id"]))


def _truths(split: Path, name: str, image: str) -> list[dict]:
    return next(r["boxes"] for r in read_jsonl(split / f"{name}.jsonl") if r["id"] == image)

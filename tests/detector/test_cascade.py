"""evaluate-cascade: detector alone vs detector + VLM, thresholds from val, pictures of the changes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from defectvlm.config import Params
from defectvlm.detector.loading import ProposalDetector
from defectvlm.detector.metrics import Box
from defectvlm.evaluate import cascade
from tests.conftest import run_cli, write_params
from tests.inference.conftest import trained  # noqa: F401  (the adapter fixture)

DEFECT = Box((10, 10, 40, 40), "slag")


def judged(image: str, images: list[tuple[list[tuple[Box, float]], list[Box]]]) -> dict:
    """`judged_split`'s answer: per image its proposals (the detector's box and confidence, with the
    VLM's P(abnormal) for it) and its truths."""
    return {
        "detector": [([box for box, _ in proposals], truths) for proposals, truths in images],
        "cascade": [([Box(b.xyxy, b.cls, p) for b, p in proposals], truths) for proposals, truths in images],
        "paths": [image] * len(images),
    }


def judged_test(image: str) -> dict:
    """Two images: the detector finds the defect (0.9) and raises two false alarms (0.8, 0.6) and a
    weak true box elsewhere; the VLM keeps the defect (0.95), rejects the alarms (0.1, 0.2) and
    wrongly rejects the weak defect (0.05)."""
    weak = Box((60, 60, 90, 90), "streak")
    alarm, other_alarm = Box((100, 10, 130, 40), "slag", 0.8), Box((5, 60, 35, 90), "streak", 0.6)
    return judged(
        image,
        [
            ([(Box(DEFECT.xyxy, "slag", 0.9), 0.95), (alarm, 0.1)], [DEFECT]),
            ([(other_alarm, 0.2), (Box(weak.xyxy, "streak", 0.7), 0.05)], [weak]),
        ],
    )


def judged_val(image: str) -> dict:
    """Three images where the best F1 (1.0, no false alarm, every defect found) puts the detector's
    threshold at 0.65 and the VLM's and both-agree's at 0.3: scores the test split does not have."""
    other = Box((60, 60, 90, 90), "slag")
    return judged(
        image,
        [
            ([(Box(DEFECT.xyxy, "slag", 0.65), 0.3)], [DEFECT]),
            ([(Box(other.xyxy, "slag", 0.95), 0.9), (Box((100, 10, 130, 40), "slag", 0.6), 0.25)], [other]),
            ([(Box((5, 60, 35, 90), "slag", 0.55), 0.2)], []),
        ],
    )


def test_thresholds_come_from_val_figures_from_test_and_the_report_shows_both_kinds(tmp_path, monkeypatch):
    image = tmp_path / "line.png"
    Image.new("RGB", (160, 120), "grey").save(image)
    splits = {"val": [{"split": "val"}], "test": [{"split": "test"}]}
    answers = {"val": judged_val(str(image)), "test": judged_test(str(image))}
    monkeypatch.setattr(cascade, "judged_split", lambda _model, _proposer, records, _min: answers[records[0]["split"]])
    proposer = ProposalDetector(detector=None, confidence=0.05, nms_iou=0.5, max_boxes=8, name="fake")
    metrics = cascade.evaluate_cascade(Params(), None, proposer, splits, tmp_path / "out")
    detector, judged_by_vlm = metrics["detector"], metrics["cascade"]
    # on test alone the best F1 would put them at 0.7, 0.95 and 0.9
    assert (detector["threshold"], judged_by_vlm["threshold"], metrics["agree"]["threshold"]) == (0.65, 0.3, 0.3)
    # the figures are test's: 2 images, and neither system is perfect there as both are on val
    assert metrics["images"] == 2
    assert (detector["precision"], detector["recall"], detector["false_alarms"]) == (0.6667, 1.0, 1)
    assert (judged_by_vlm["precision"], judged_by_vlm["recall"], judged_by_vlm["false_alarms"]) == (1.0, 0.5, 0)
    assert judged_by_vlm["false_alarms_per_image"] == 0.0 and detector["false_alarms_per_image"] == 0.5
    assert judged_by_vlm["per_class"]["slag"]["recall"] == 1.0 and judged_by_vlm["per_class"]["streak"]["recall"] == 0
    # the 0.6 alarm is below the detector's own threshold: not one of its false alarms
    assert metrics["gallery"] == {"false_alarms_removed": 1, "defects_wrongly_removed": 1}
    out = tmp_path / "out"
    report = (out / "cascade_report.md").read_text()
    for name in ("false_alarms_removed_00", "defects_wrongly_removed_00"):
        assert (out / "gallery" / f"{name}.png").is_file() and f"gallery/{name}.png" in report
    assert (out / "plots" / "cascade_pr.png").is_file()
    assert json.loads((out / "cascade_metrics.json").read_text())["gain"]["precision"] == 0.3333
    # both agree: min(detector, VLM) = [0.9, 0.1], [0.2, 0.05]: at 0.3 only the defect stays
    agree = metrics["agree"]
    assert (agree["precision"], agree["recall"], agree["false_alarms"]) == (1.0, 0.5, 0)
    assert metrics["gain_agree"] == {"precision": 0.3333, "recall": -0.5, "false_alarms_per_image_ratio": 0.0}
    assert "| both agree (min of the two scores) | 0.3 | 1.0 | 0.5 |" in report


@pytest.mark.slow
def test_evaluate_cascade_end_to_end(trained, detector_dir, sft_dir, tmp_path):  # noqa: F811
    params = write_params(tmp_path / "params.yaml", {})
    split = sft_dir.parent / "02"
    args = ("--run", trained[2], "--detector", detector_dir, "--in", split, "--out", tmp_path / "r")
    assert run_cli("evaluate-cascade", "--params", params, *args) == 0
    metrics = json.loads((tmp_path / "r" / "cascade_metrics.json").read_text())
    test_images = sum(1 for line in (split / "test.jsonl").read_text().splitlines() if line.strip())
    assert metrics["images"] == test_images
    assert 0 < metrics["proposals"]["proposals_per_image"] <= 8
    for system in ("detector", "cascade", "agree"):
        m = metrics[system]
        assert m["truths"] == metrics["proposals"]["truths"] and 0 <= m["precision"] <= 1
    assert (tmp_path / "r" / "plots" / "cascade_pr.png").is_file()

"""Scoring pass, metrics, thresholds, the lenient parser and the report."""

import json
import re

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from defectvlm.config import params_from_dict
from defectvlm.detector.metrics import Box
from defectvlm.evaluate.cascade import box_threshold
from defectvlm.evaluate.metrics import best_threshold, binary_metrics
from defectvlm.evaluate.run import evaluate
from defectvlm.evaluate.scoring import parse_answer, score_samples
from defectvlm.io import read_jsonl
from defectvlm.models.loading import load_base

CLASSES = ["incomplete_spreading", "over_melt", "slag", "streak"]


def test_metrics_agree_with_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.integers(0, 2, 200).tolist()
        scores = rng.random(200).tolist()
        threshold = float(rng.random())
        m = binary_metrics(truth, scores, threshold)
        predicted = [int(s >= threshold) for s in scores]
        assert m["precision"] == pytest.approx(precision_score(truth, predicted, zero_division=0), abs=1e-4)
        assert m["recall"] == pytest.approx(recall_score(truth, predicted), abs=1e-4)
        assert m["f1"] == pytest.approx(f1_score(truth, predicted), abs=1e-4)
        assert m["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-4)
        c = m["counts"]
        assert c["tp"] + c["fp"] + c["fn"] + c["tn"] == 200 and c["tp"] + c["fn"] == sum(truth)


def test_best_threshold_is_the_f1_maximum():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 300)
    scores = np.clip(truth * 0.3 + rng.random(300) * 0.7, 0, 1)
    threshold, f1 = best_threshold(truth.tolist(), scores.tolist())
    brute = max(f1_score(truth, scores >= t) for t in np.unique(scores))
    assert f1 == pytest.approx(brute, abs=1e-9)
    assert f1_score(truth, scores >= threshold) == pytest.approx(brute, abs=1e-9)


def test_the_roi_and_the_cascade_thresholds_break_an_f1_tie_the_same_way():
    """Two positives ranked first and last: flagging the top score and flagging all four both give
    F1 2/3. The VLM's ROI threshold and the cascade's box threshold both take the lower one."""
    truth, scores = [1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]
    defects = [Box((0, 0, 10, 10), "slag"), Box((50, 50, 60, 60), "slag")]
    boxes = [(0, 0, 10, 10), (100, 0, 110, 10), (100, 50, 110, 60), (50, 50, 60, 60)]
    proposals = [Box(xyxy, "slag", score) for xyxy, score in zip(boxes, scores, strict=True)]
    assert best_threshold(truth, scores) == (0.6, pytest.approx(2 / 3))
    assert box_threshold([(proposals, defects)]) == 0.6


@pytest.mark.parametrize(
    ("text", "parsed", "missing", "unknown"),
    [
        ("R1: normal\nR2: abnormal | slag", {"R1": ("normal", None), "R2": ("abnormal", "slag")}, [], 0),
        ("R2：异常｜streak\n结论：发现 1 处缺陷", {"R2": ("abnormal", "streak")}, ["R1"], 0),
        ("Sure! R1: abnormal | crack\nR1: normal", {"R1": ("abnormal", None)}, ["R2"], 1),
        ("r1: Normal\nR9: abnormal | slag\ngarbage", {"R1": ("normal", None)}, ["R2"], 0),
        ("", {}, ["R1", "R2"], 0),
        (None, {}, ["R1", "R2"], 0),
    ],
)
def test_answer_parser_is_lenient_and_counts_what_it_cannot_read(text, parsed, missing, unknown):
    result = parse_answer(text, ["R1", "R2"], CLASSES)
    assert result == {"regions": parsed, "missing": missing, "unknown_classes": unknown}


def test_answer_parser_reads_any_class_string_whole():
    classes = ["条纹", "slag", "slag_heavy", "over melt"]
    text = (
        "R1：异常｜条纹\nR2: abnormal | slag_heavy\nR3: abnormal|slag。\nR4: abnormal | over melt\nR5: abnormal | 灰渣"
    )
    result = parse_answer(text, ["R1", "R2", "R3", "R4", "R5"], classes)
    assert result["regions"] == {
        "R1": ("abnormal", "条纹"),
        "R2": ("abnormal", "slag_heavy"),
        "R3": ("abnormal", "slag"),
        "R4": ("abnormal", "over melt"),
        "R5": ("abnormal", None),
    }
    assert result["unknown_classes"] == 1


@pytest.mark.slow
def test_evaluate_writes_report_and_takes_the_threshold_from_val(sft_dir, tmp_path):
    params = params_from_dict({})
    metrics = evaluate(params, "base", sft_dir, tmp_path / "reports")
    model, processor = load_base(params.model)
    classes = json.loads((sft_dir / "sft_summary.json").read_text())["classes"]
    val_rows = score_samples(model, processor, read_jsonl(sft_dir / "val.jsonl"), classes)
    expected, _ = best_threshold([int(r["truth"] == "abnormal") for r in val_rows], [r["score"] for r in val_rows])
    assert metrics["test"]["threshold"] == pytest.approx(expected, abs=1e-6)
    test_rows = read_jsonl(tmp_path / "reports" / "predictions.jsonl")
    on_test, _ = best_threshold([int(r["truth"] == "abnormal") for r in test_rows], [r["score"] for r in test_rows])
    assert on_test != pytest.approx(expected)  # the test split would have picked another one
    report = (tmp_path / "reports" / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert any(link.startswith("plots/") for link in links)
    for link in links:
        path = tmp_path / "reports" / link
        assert path.exists() and path.stat().st_size > 1000, link
    inference = json.loads((tmp_path / "reports" / "inference.json").read_text())
    assert inference["chosen_on"] == "val" and inference["threshold"] == metrics["test"]["threshold"]

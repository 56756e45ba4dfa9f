"""Box-level matching and the numbers built on it (detector report and cascade evaluation)."""

from __future__ import annotations

import pytest

from defectvlm.detector.metrics import Box, average_precision, counts_at, match, scored_hits
from defectvlm.evaluate.cascade import box_threshold

TRUTH = [Box((0, 0, 10, 10), "a"), Box((20, 20, 30, 30), "b")]


def test_greedy_matching_counts_a_duplicate_as_a_false_alarm():
    predictions = [Box((0, 0, 10, 10), "a", 0.9), Box((1, 0, 11, 10), "a", 0.8), Box((50, 50, 60, 60), "a", 0.7)]
    assert match(predictions, TRUTH, class_aware=False) == [True, False, False]


def test_the_higher_score_takes_the_truth_whatever_the_order_given():
    predictions = [Box((1, 0, 11, 10), "a", 0.5), Box((0, 0, 10, 10), "a", 0.9)]
    assert match(predictions, TRUTH, class_aware=False) == [False, True]


def test_class_aware_matching_needs_the_class():
    predictions = [Box((20, 20, 30, 30), "a", 0.9)]
    assert match(predictions, TRUTH, class_aware=False) == [True]
    assert match(predictions, TRUTH, class_aware=True) == [False]


def test_iou_below_one_half_is_a_miss():
    assert match([Box((0, 0, 10, 4), "a", 0.9)], TRUTH, class_aware=False) == [False]  # IoU 0.4


def test_counts_precision_recall_and_false_alarms_per_image():
    images = [
        ([Box((0, 0, 10, 10), "a", 0.9), Box((50, 50, 60, 60), "a", 0.4)], TRUTH),
        ([Box((5, 5, 9, 9), "a", 0.8)], []),
    ]
    at_low = counts_at(images, 0.3, class_aware=False)
    assert (at_low["precision"], at_low["recall"], at_low["false_alarms"]) == (pytest.approx(1 / 3, abs=1e-4), 0.5, 2)
    assert at_low["false_alarms_per_image"] == 1.0
    at_high = counts_at(images, 0.85, class_aware=False)
    assert (at_high["precision"], at_high["recall"], at_high["false_alarms"]) == (1.0, 0.5, 0)
    assert box_threshold(images) == 0.9


def test_average_precision_of_a_known_ranking():
    # hits at ranks 1 and 3 of 2 truths: precision 1 at recall 0.5, 2/3 at recall 1
    ranked = [Box((0, 0, 10, 10), "a", 0.9), Box((40, 40, 50, 50), "a", 0.8), Box((20, 20, 30, 30), "a", 0.7)]
    images = [(ranked, TRUTH)]
    scores, hits, truths = scored_hits(images, class_aware=False)
    assert average_precision(scores, hits, truths) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)

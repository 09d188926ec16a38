import numpy as np
import pytest

from app.ml.scoring.metric import (
    THRESHOLDS,
    dataset_score,
    image_score,
    iou_matrix,
    score_per_threshold,
    seg_jaccards,
)
from tests.conftest import disk

SHAPE = (64, 64)


def labels_of(*masks: np.ndarray) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.int32)
    for number, mask in enumerate(masks, start=1):
        labels[mask] = number
    return labels


def strip(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[rows, cols] = True
    return mask


def test_thresholds_are_the_competitions():
    assert THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_perfect_prediction_scores_one():
    truth = labels_of(disk(SHAPE, (20, 20), 8), disk(SHAPE, (40, 45), 10))
    assert image_score(truth, truth) == 1.0


def test_labels_numbered_differently_still_match():
    truth = labels_of(disk(SHAPE, (20, 20), 8), disk(SHAPE, (40, 45), 10))
    assert image_score(truth, np.where(truth > 0, 3 - truth, 0)) == 1.0


def test_empty_prediction_scores_zero():
    truth = labels_of(disk(SHAPE, (20, 20), 8))
    assert image_score(truth, np.zeros(SHAPE, dtype=np.int32)) == 0.0


def test_both_empty_scores_one():
    empty = np.zeros(SHAPE, dtype=np.int32)
    assert image_score(empty, empty) == 1.0


def test_prediction_at_iou_072_counts_for_5_of_10_thresholds():
    truth = labels_of(strip(slice(0, 10), slice(0, 50)))  # 500 pixels
    pred = labels_of(strip(slice(0, 10), slice(0, 36)))  # 360 inside: IoU = 360 / 500 = 0.72
    assert iou_matrix(truth, pred)[0, 0] == pytest.approx(0.72)
    per_threshold = score_per_threshold(truth, pred)
    assert per_threshold.tolist() == [1.0] * 5 + [0.0] * 5
    assert image_score(truth, pred) == 0.5


def test_false_positives_and_negatives_count_per_threshold():
    a, b, c = disk(SHAPE, (15, 15), 6), disk(SHAPE, (45, 45), 6), disk(SHAPE, (15, 48), 5)
    truth = labels_of(a, b)
    pred = labels_of(a, c)  # a matches; b is missed (FN); c is spurious (FP): 1 / (1 + 1 + 1)
    assert image_score(truth, pred) == pytest.approx(1 / 3)


def test_iou_with_a_shifted_disk_is_hand_computed():
    a = disk(SHAPE, (32, 32), 10)
    b = np.roll(a, 4, axis=1)
    expected = (a & b).sum() / (a | b).sum()
    assert iou_matrix(labels_of(a), labels_of(b))[0, 0] == pytest.approx(expected)


def test_iou_matrix_has_one_row_per_truth_and_column_per_prediction():
    truth = labels_of(disk(SHAPE, (15, 15), 6), disk(SHAPE, (45, 45), 6), disk(SHAPE, (15, 48), 5))
    pred = labels_of(disk(SHAPE, (45, 45), 6))
    iou = iou_matrix(truth, pred)
    assert iou.shape == (3, 1)
    assert iou[:, 0].tolist() == [0.0, 1.0, 0.0]


def test_dataset_score_averages_images():
    truth = labels_of(disk(SHAPE, (20, 20), 8))
    empty = np.zeros(SHAPE, dtype=np.int32)
    assert dataset_score([(truth, truth), (truth, empty)]) == 0.5


def test_seg_scores_each_labelled_cell_by_the_predicted_cell_covering_more_than_half_of_it():
    left, right = strip(slice(0, 10), slice(0, 10)), strip(slice(20, 30), slice(20, 30))
    truth = labels_of(left, right)
    # Covers 80 of left's 100 pixels exactly; covers exactly half of right (50 pixels), which is not more than half.
    pred = labels_of(strip(slice(0, 8), slice(0, 10)), strip(slice(20, 25), slice(20, 30)))
    assert seg_jaccards(truth, pred) == pytest.approx([0.8, 0.0])
    # A larger cell over left: J = 100 / 120.
    assert seg_jaccards(truth, labels_of(strip(slice(0, 12), slice(0, 10))))[0] == pytest.approx(100 / 120)


def test_seg_costs_nothing_for_unlabelled_cells_unlike_the_competition_metric():
    cell = disk(SHAPE, (20, 20), 8)
    truth = labels_of(cell)
    with_an_unlabelled_cell = labels_of(cell, disk(SHAPE, (45, 45), 8))
    assert seg_jaccards(truth, with_an_unlabelled_cell) == pytest.approx([1.0])
    assert image_score(truth, with_an_unlabelled_cell) == pytest.approx(0.5)
    assert seg_jaccards(truth, np.zeros(SHAPE, dtype=np.int32)) == pytest.approx([0.0])
    assert seg_jaccards(np.zeros(SHAPE, dtype=np.int32), truth).size == 0

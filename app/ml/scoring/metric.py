"""The competition's score: mean over IoU thresholds 0.50..0.95 of TP / (TP + FP + FN), then over images."""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.round(np.arange(0.50, 0.951, 0.05), 2)


def overlaps(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W) label maps -> |R & S| of every (truth, predicted) pair (N_truth, N_pred), and the areas of the true
    cells (N_truth, 1) and of the predicted ones (1, N_pred), from one joint histogram (no loop over pairs)."""
    truth = np.asarray(truth, dtype=np.int64).ravel()
    pred = np.asarray(pred, dtype=np.int64).ravel()
    n_true, n_pred = int(truth.max(initial=0)), int(pred.max(initial=0))
    joint = np.bincount(truth * (n_pred + 1) + pred, minlength=(n_true + 1) * (n_pred + 1))
    joint = joint.reshape(n_true + 1, n_pred + 1)
    return joint[1:, 1:], joint[1:, :].sum(axis=1, keepdims=True), joint[:, 1:].sum(axis=0, keepdims=True)


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W) label maps -> (N_truth, N_pred) IoU of every pair."""
    intersection, area_true, area_pred = overlaps(truth, pred)
    return intersection / np.maximum(area_true + area_pred - intersection, 1)


def score_per_threshold(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W) label maps -> (10,) TP / (TP + FP + FN) at each IoU threshold; 1.0 where both are empty."""
    iou = iou_matrix(truth, pred)
    n_true, n_pred = iou.shape
    if n_true == 0 and n_pred == 0:
        return np.ones(THRESHOLDS.size)
    # IoU > 0.5 admits at most one partner per cell, so counting pairs above t counts true positives.
    tp = (iou[..., None] > THRESHOLDS).sum(axis=(0, 1))
    return tp / (n_true + n_pred - tp)


def image_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """The competition's score of one image."""
    return float(score_per_threshold(truth, pred).mean())


def dataset_score(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean of image_score over (truth, prediction) pairs, as the leaderboard averages images."""
    return float(np.mean([image_score(t, p) for t, p in pairs])) if pairs else float("nan")


def seg_jaccards(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The Cell Tracking Challenge's SEG measure, per labelled cell: for each cell R of `truth`, the Jaccard index
    |R & S| / |R | S| of the predicted cell S that covers more than half of R, else 0. Unlabelled cells cost nothing,
    which suits labels that leave some cells out. SEG is the mean of these over every labelled cell of a data set."""
    intersection, area_true, area_pred = overlaps(truth, pred)
    if intersection.shape[1] == 0:
        return np.zeros(intersection.shape[0])
    jaccard = intersection / np.maximum(area_true + area_pred - intersection, 1)
    # More than half of R: at most one S can cover that much.
    return np.where(2 * intersection > area_true, jaccard, 0.0).max(axis=1)

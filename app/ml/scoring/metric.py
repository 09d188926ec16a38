"""The competition's score: mean over IoU thresholds 0.50..0.95 of TP / (TP + FP + FN), then over images."""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.round(np.arange(0.50, 0.951, 0.05), 2)


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W) label maps -> (N_truth, N_pred) IoU of every pair, from one joint histogram (no loop over pairs)."""
    truth = np.asarray(truth, dtype=np.int64).ravel()
    pred = np.asarray(pred, dtype=np.int64).ravel()
    n_true, n_pred = int(truth.max(initial=0)), int(pred.max(initial=0))
    joint = np.bincount(truth * (n_pred + 1) + pred, minlength=(n_true + 1) * (n_pred + 1))
    joint = joint.reshape(n_true + 1, n_pred + 1)
    intersection = joint[1:, 1:]
    area_true = joint[1:, :].sum(axis=1, keepdims=True)
    area_pred = joint[:, 1:].sum(axis=0, keepdims=True)
    union = area_true + area_pred - intersection
    return intersection / np.maximum(union, 1)


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

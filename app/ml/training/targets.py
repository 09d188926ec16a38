"""Training targets from instance labels: the classes background / interior / border, the paper's weight map, and
a centre map (each cell's distance to its own edge, 1 at its centre) that seeds the watershed in centre models."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from app.ml.unet import BORDER, INTERIOR, NUM_CLASSES


def label_to_classes(labels: np.ndarray, border_width: int = 1) -> np.ndarray:
    """(H, W) int instances -> (H, W) uint8 classes: a cell pixel within border_width of another label is border."""
    size = 2 * border_width + 1
    differs = (ndimage.maximum_filter(labels, size) != labels) | (ndimage.minimum_filter(labels, size) != labels)
    classes = np.zeros(labels.shape, dtype=np.uint8)
    classes[labels > 0] = INTERIOR
    classes[(labels > 0) & differs] = BORDER
    return classes


def class_balance(classes: np.ndarray, cap: float = 10.0) -> np.ndarray:
    """(H, W) classes -> (NUM_CLASSES,) float32 weights, inverse to frequency, the most frequent class at 1."""
    counts = np.bincount(classes.ravel(), minlength=NUM_CLASSES).astype(np.float64)
    present = counts > 0
    weights = np.ones(NUM_CLASSES)
    weights[present] = counts[present].max() / counts[present]
    return np.minimum(weights, cap).astype(np.float32)


def weight_map(labels: np.ndarray, classes: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """(H, W) -> (H, W) float32: w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels.

    d1 and d2 are the distances to the nearest and second-nearest cell (Ronneberger et al. 2015, eq. 2).
    """
    weights = class_balance(classes)[classes]
    d1, d2 = nearest_two_distances(labels, cutoff=_separation_cutoff(w0, sigma))
    separation = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    return (weights + np.where(labels == 0, separation, 0.0)).astype(np.float32)


def _separation_cutoff(w0: float, sigma: float, negligible: float = 1e-3) -> int:
    """Beyond this d1 + d2 the separation term is under `negligible`, so distances need not be known."""
    return math.ceil(sigma * math.sqrt(2.0 * math.log(max(w0, 1.0) / negligible)))


def nearest_two_distances(labels: np.ndarray, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) instances -> distances to the nearest and second-nearest cell, exact up to `cutoff`, else inf.

    Each cell's distance transform is computed only in its bounding box grown by `cutoff`, which makes
    this linear in the number of cells instead of cells x image.
    """
    d1 = np.full(labels.shape, np.inf, dtype=np.float32)
    d2 = np.full(labels.shape, np.inf, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        window = tuple(slice(max(s.start - cutoff, 0), s.stop + cutoff) for s in box)
        dist = ndimage.distance_transform_edt(labels[window] != index).astype(np.float32)
        near, second = d1[window], d2[window]
        d2[window] = np.minimum(second, np.maximum(near, dist))
        d1[window] = np.minimum(near, dist)
    return d1, d2


def centre_map(labels: np.ndarray) -> np.ndarray:
    """(H, W) int instances -> (H, W) float32 in [0, 1]: each cell pixel's distance to the nearest pixel outside
    its cell, divided by the largest such distance in the cell (1 at the cell's centre, small at its edge, 0 on
    the background).

    Thresholding it keeps one core per cell, however thin its processes or however tightly it touches its
    neighbours, which is why strong U-Net entries of the competition seeded their watershed from such a map.
    """
    inside = labels > 0
    own = inside & (ndimage.minimum_filter(labels, 3) == labels) & (ndimage.maximum_filter(labels, 3) == labels)
    # Distance to the nearest pixel that is not strictly inside a cell: the background or another cell's edge.
    distance = ndimage.distance_transform_edt(own).astype(np.float32) + inside
    count = int(labels.max(initial=0))
    largest = np.asarray(ndimage.maximum(distance, labels, np.arange(count + 1)), dtype=np.float32)
    largest[0] = 1.0
    return np.where(inside, distance / np.maximum(largest[labels], 1.0), 0.0).astype(np.float32)

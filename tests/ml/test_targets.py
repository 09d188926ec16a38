import numpy as np
import pytest

from app.ml.training.targets import (
    centre_map,
    label_to_classes,
    nearest_two_distances,
    weight_map,
)
from app.ml.unet import BACKGROUND, BORDER, INTERIOR
from tests.conftest import disk


def test_classes_mark_the_contour_of_every_cell_as_border():
    labels = np.zeros((30, 30), dtype=np.int32)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2  # touches cell 1
    classes = label_to_classes(labels)
    assert classes[0, 0] == BACKGROUND
    assert classes[10, 10] == INTERIOR
    assert classes[10, 14] == BORDER and classes[10, 15] == BORDER  # the seam between the two cells
    assert classes[5, 10] == BORDER  # the outer contour
    assert (classes[labels == 0] == BACKGROUND).all()


def test_nearest_two_distances_match_brute_force():
    rng = np.random.default_rng(0)
    labels = np.zeros((50, 60), dtype=np.int32)
    for number in range(1, 6):
        labels[disk(labels.shape, (rng.integers(5, 45), rng.integers(5, 55)), rng.integers(3, 6))] = number
    d1, d2 = nearest_two_distances(labels, cutoff=1000)
    yy, xx = np.mgrid[0:50, 0:60]
    brute = []
    for number in range(1, labels.max() + 1):
        cy, cx = np.nonzero(labels == number)
        brute.append(np.sqrt((yy[..., None] - cy) ** 2 + (xx[..., None] - cx) ** 2).min(axis=-1))
    brute = np.sort(np.stack(brute), axis=0)
    assert np.allclose(d1, brute[0]) and np.allclose(d2, brute[1])


def test_weight_map_is_highest_in_the_narrow_gap_between_cells():
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[disk(labels.shape, (20, 18), 10)] = 1
    labels[disk(labels.shape, (20, 41), 10)] = 2  # a 3-pixel gap at columns 29..30
    weights = weight_map(labels, label_to_classes(labels), w0=10, sigma=5)
    gap, far = weights[20, 29], weights[2, 2]
    assert gap > 8 and far < 1.5
    assert gap > weights[20, 18]  # more than inside a cell


def test_the_centre_map_peaks_at_one_in_every_cell_and_is_zero_on_the_background():
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[disk((40, 60), (20, 15), 9)] = 1
    labels[disk((40, 60), (20, 33), 9) & (labels == 0)] = 2  # touches cell 1
    labels[30:33, 40:58] = 3  # thin and long
    centre = centre_map(labels)
    assert centre.dtype == np.float32 and centre.shape == labels.shape
    assert (centre[labels == 0] == 0).all()
    for cell in (1, 2, 3):
        inside = centre[labels == cell]
        assert inside.max() == pytest.approx(1.0) and inside.min() > 0
    assert centre[20, 15] == pytest.approx(1.0) and centre[20, 33] == pytest.approx(1.0)
    # Where the two cells touch the map dips, so a threshold keeps them apart.
    seam = labels[20] != np.roll(labels[20], 1)
    assert centre[20][seam & (labels[20] > 0)].max() < 0.35
    assert (centre[31, 41:57] == 1.0).all()  # a 3-pixel-wide cell: its middle row is its centre

import numpy as np
import pytest
from scipy import ndimage

from app.ml.errors import InvalidOptionError
from app.ml.kaggle import KaggleDataset
from app.ml.metrics import image_score, iou_matrix
from app.ml.postprocess import InstanceConfig, mean_per_label, probabilities_to_instances
from app.ml.synth import generate_image
from app.ml.targets import BORDER, INTERIOR, label_to_classes
from tests.conftest import disk


def soft_probabilities(labels: np.ndarray, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """What a good network would output for these labels: one-hot classes, optionally noisy -> (3, H, W)."""
    one_hot = np.eye(3, dtype=np.float32)[label_to_classes(labels)].transpose(2, 0, 1)
    noisy = one_hot + noise * np.random.default_rng(seed).random(one_hot.shape, dtype=np.float32)
    return noisy / noisy.sum(axis=0, keepdims=True)


def two_touching_disks(shape=(60, 80)) -> np.ndarray:
    left, right = disk(shape, (30, 28), 13), disk(shape, (30, 52), 13)  # centres 24 apart: they overlap
    labels = np.zeros(shape, dtype=np.int32)
    labels[left] = 1
    labels[right & ~left] = 2
    return labels


def test_two_touching_disks_come_out_as_two_instances():
    truth = two_touching_disks()
    assert (label_to_classes(truth)[truth > 0] == BORDER).sum() > 0
    instances = probabilities_to_instances(soft_probabilities(truth, noise=0.2))
    assert instances.count == 2
    assert np.sort(iou_matrix(truth, instances.labels).max(axis=1)).tolist() > [0.9, 0.9]


def test_the_foreground_without_borders_would_merge_them():
    """Control: thresholding the foreground alone gives one blob, so the border class is what splits them."""
    truth = two_touching_disks()
    assert ndimage.label(truth > 0)[1] == 1


def test_instances_never_overlap_and_are_numbered_1_to_n():
    synth = generate_image(np.random.default_rng(3), 128, 128, "cort", density=1.5)
    instances = probabilities_to_instances(soft_probabilities(synth.labels, noise=0.3))
    assert instances.labels.dtype == np.int32
    assert np.unique(instances.labels).tolist() == list(range(instances.count + 1))
    assert instances.scores.shape == (instances.count,)
    assert ((instances.scores > 0.5) & (instances.scores <= 1.0)).all()


@pytest.mark.parametrize(("cell_type", "floor"), [("cort", 0.95), ("astro", 0.95), ("shsy5y", 0.8)])
def test_synthetic_touching_cells_survive_the_class_representation(cell_type, floor):
    # Elongated cells squeezed between neighbours lose a few pixels to them in the watershed: a lower floor.
    scores = []
    for seed in range(3):
        synth = generate_image(np.random.default_rng(seed), 160, 160, cell_type, density=1.5)
        instances = probabilities_to_instances(soft_probabilities(synth.labels))
        scores.append(image_score(synth.labels, instances.labels))
    assert np.mean(scores) > floor


def test_real_cells_survive_the_class_representation(sartorius):
    sample = KaggleDataset(sartorius).load(0)
    instances = probabilities_to_instances(soft_probabilities(sample.labels))
    assert image_score(sample.labels, instances.labels) > 0.9


def test_small_cells_are_dropped_by_the_configured_minimum_area():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[disk((40, 40), (10, 10), 6)] = 1  # ~113 px
    labels[disk((40, 40), (30, 30), 3)] = 2  # ~29 px
    probs = soft_probabilities(labels)
    assert probabilities_to_instances(probs, InstanceConfig(min_cell_area=10)).count == 2
    assert probabilities_to_instances(probs, InstanceConfig(min_cell_area=60)).count == 1


def test_foreground_blobs_without_a_seed_still_become_cells():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[disk((40, 40), (20, 20), 8)] = 1
    probs = soft_probabilities(labels)
    probs[INTERIOR], probs[BORDER] = probs[INTERIOR] * 0.3, probs[BORDER] + probs[INTERIOR] * 0.7  # no seed
    assert probabilities_to_instances(probs).count == 1


def test_threshold_overrides_are_range_checked():
    config = InstanceConfig().with_overrides(seed_threshold=0.8, min_cell_area=None)
    assert config.seed_threshold == 0.8 and config.min_cell_area == InstanceConfig().min_cell_area
    with pytest.raises(InvalidOptionError, match=r"foreground_threshold=1.5 is outside the allowed range"):
        InstanceConfig().with_overrides(foreground_threshold=1.5)


def test_mean_per_label():
    labels = np.array([[0, 1, 1], [2, 2, 2]])
    values = np.array([[9.0, 1.0, 3.0], [1.0, 2.0, 3.0]])
    assert mean_per_label(values, labels).tolist() == [2.0, 2.0]

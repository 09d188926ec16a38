import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from app.ml.checkpoint import resolve_model_folder
from app.ml.data.kaggle import KaggleDataset, Sample
from app.ml.data.synth import generate_image
from app.ml.errors import InvalidOptionError
from app.ml.imageio import read_image
from app.ml.options import InferenceOptions
from app.ml.postprocess import InstanceConfig, grow_seeds, maps_to_instances, probabilities_to_instances
from app.ml.scoring.metric import image_score, iou_matrix
from app.ml.scoring.tuning import tune_thresholds
from app.ml.serving.predictor import Predictor
from app.ml.training.targets import label_to_classes
from app.ml.unet import BORDER, INTERIOR
from tests.conftest import MODEL_STORE, disk


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


def test_areas_and_scores_are_each_cells_pixel_count_and_mean_foreground_probability():
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[disk((40, 60), (20, 15), 9)] = 1
    labels[disk((40, 60), (20, 45), 6)] = 2
    probs = soft_probabilities(labels, noise=0.3)
    instances = probabilities_to_instances(probs)
    foreground_prob = 1.0 - probs[0]
    for cell in range(1, instances.count + 1):
        pixels = instances.labels == cell
        assert instances.areas[cell - 1] == pixels.sum()
        assert instances.scores[cell - 1] == pytest.approx(foreground_prob[pixels].mean(), rel=1e-5)
    assert sorted(instances.areas.tolist()) == sorted([(labels == 1).sum(), (labels == 2).sum()])


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_grow_seeds_gives_the_labels_of_the_plain_watershed(source, sartorius):
    """Leaving the seeds' inner pixels out of the flood is a speed-up only: the labels must not change."""
    if source == "real":
        predictor = Predictor.from_checkpoint(
            resolve_model_folder(MODEL_STORE), InferenceOptions(device="cpu", backend="torch", compile=False)
        )
        prepared = predictor.prepare(read_image(next((sartorius / "test").glob("*.png"))))
        probs = predictor.tiler.stitch(predictor.run_tiles(prepared.tiles), prepared.grid, prepared.original_shape)
    else:
        synth = generate_image(np.random.default_rng(5), 160, 160, "astro", density=1.5)
        probs = soft_probabilities(synth.labels, noise=0.4)
    foreground = probs[0] < 0.5
    seeds, _ = ndimage.label((probs[INTERIOR] > 0.6) & foreground)
    landscape = probs[BORDER] - probs[INTERIOR]
    plain = watershed(landscape, markers=seeds, mask=foreground)
    assert seeds.max() > 5 and (plain != seeds).sum() > 100  # the flood has real work to do
    np.testing.assert_array_equal(grow_seeds(landscape, seeds, foreground), plain)


def test_the_threshold_search_picks_a_smallest_seed_that_keeps_a_thin_cell_whole():
    """A cell whose seed map breaks into a large core and specks (as an astrocyte's thin processes do): with the
    default smallest seed each speck grows into a cell of its own; the search finds a size that drops them."""
    shape = (80, 80)
    cell = disk(shape, (40, 40), 25)
    seed_map = np.where(disk(shape, (40, 40), 6), 0.95, 0.1).astype(np.float32)
    for centre in ((25, 40), (55, 40), (40, 25), (40, 55)):  # 3x3 specks of 9 px, far from the core
        seed_map[centre[0] - 1 : centre[0] + 2, centre[1] - 1 : centre[1] + 2] = 0.95
    maps = np.stack((np.where(cell, 0.95, 0.05), seed_map)).astype(np.float32)
    scored = [(Sample("thin", np.zeros(shape, np.float32), cell.astype(np.int32), ["astro"], {}), maps)]

    base = InstanceConfig(min_seed_area=6)
    config, score = tune_thresholds(scored, base)

    assert maps_to_instances(maps, base).count == 5
    assert config.min_seed_area > 9
    assert score == pytest.approx(1.0)

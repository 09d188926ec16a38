"""The torch instance step against the reference (app.ml.postprocess.maps_to_instances), both on CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from app.ml.data.labelled import open_labelled
from app.ml.imageio import read_image
from app.ml.options import InferenceOptions
from app.ml.postprocess import InstanceConfig, Instances, maps_to_instances
from app.ml.scoring.metric import image_score
from app.ml.serving.gpu_instances import _components, maps_to_instances_torch
from app.ml.serving.predictor import Predictor
from tests.conftest import MODEL_STORE, disk

TRAIN_ID = "0030fd0e6378"
ASTROCYTE_LIKE = InstanceConfig(foreground_threshold=0.8, seed_threshold=0.5, min_seed_area=12, min_cell_area=256)
CONFIGS = {"model": None, "astrocyte-like": ASTROCYTE_LIKE, "package-default": InstanceConfig()}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The torch step is hundreds of small operations: split over two threads on a busy 2-core machine, each one
    waits for the other thread's time slice, and the tests run twenty times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_checkpoint(MODEL_STORE / "sartorius-w16-v3", InferenceOptions.float32())


@pytest.fixture(scope="module")
def real_maps(sartorius: Path, predictor: Predictor) -> dict[str, np.ndarray]:
    """Image id -> (2, H, W) float32 maps of the shipped model: the training image, then the three test images."""
    paths = [sartorius / "train" / f"{TRAIN_ID}.png", *sorted((sartorius / "test").glob("*.png"))]
    return {path.stem: predictor.predict_maps(read_image(path)) for path in paths}


def matched_labels(reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> the same image with each cell renamed as the reference cell it overlaps most (-1: none)."""
    n_ref, n_got = int(reference.max()) + 1, int(labels.max()) + 1
    pairs = labels.astype(np.int64) * n_ref + reference
    overlap = np.bincount(pairs.ravel(), minlength=n_got * n_ref).reshape(n_got, n_ref)[:, 1:]
    match = np.where(overlap.max(axis=1) > 0, overlap.argmax(axis=1) + 1, -1)
    match[0] = 0
    return match[labels]


def foreground_agreement(reference: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the pixels in either foreground whose matched label equals the reference label."""
    either = (reference > 0) | (labels > 0)
    return float((matched_labels(reference, labels)[either] == reference[either]).mean())


def assert_well_formed(instances: Instances, foreground_prob: np.ndarray) -> None:
    """Dtypes and shapes as the reference's; cells numbered 1..N; areas and scores measured on the labels."""
    n = instances.count
    assert instances.labels.dtype == np.int32 and instances.labels.shape == foreground_prob.shape
    assert instances.scores.dtype == np.float32 and instances.scores.shape == (n,)
    assert instances.areas.dtype == np.int64 and instances.areas.shape == (n,)
    assert np.unique(instances.labels).tolist() == list(range(n + 1))
    flat = instances.labels.ravel()
    np.testing.assert_array_equal(instances.areas, np.bincount(flat, minlength=n + 1)[1:])
    sums = np.bincount(flat, weights=foreground_prob.ravel(), minlength=n + 1)[1:]
    np.testing.assert_allclose(instances.scores, sums / np.maximum(instances.areas, 1), rtol=1e-5)


def run_both(maps: np.ndarray, config: InstanceConfig) -> tuple[Instances, Instances]:
    return maps_to_instances(maps, config), maps_to_instances_torch(torch.from_numpy(maps), config)


# ---------------------------------------------------------------------- real maps


@pytest.mark.parametrize("config_name", CONFIGS)
def test_real_maps_give_the_reference_cells(config_name, real_maps, predictor):
    config = CONFIGS[config_name] or predictor.rules.default
    for image_id, maps in real_maps.items():
        reference, got = run_both(maps, config)
        assert_well_formed(got, maps[0])
        agreement = foreground_agreement(reference.labels, got.labels)
        assert agreement >= 0.98, f"{image_id}: {agreement:.4f} of the foreground agrees"
        # A cell within a few pixels of min_cell_area can land on either side of it, so one cell of slack
        # where 2 % is less than one.
        assert abs(got.count - reference.count) <= max(1.0, 0.02 * reference.count), image_id


def test_real_score_matches_the_reference_score(sartorius, real_maps, predictor):
    sample = open_labelled([sartorius]).load(0)
    assert sample.image_id == TRAIN_ID
    reference, got = run_both(real_maps[TRAIN_ID], predictor.rules.default)
    assert abs(image_score(sample.labels, got.labels) - image_score(sample.labels, reference.labels)) <= 0.005


# ---------------------------------------------------------------------- hand-made scenes


def scene(shape: tuple[int, int], cells: list[np.ndarray], seeds: list[np.ndarray]) -> np.ndarray:
    """(2, H, W) float32 maps: foreground 0.95 on the cells (0.05 elsewhere), seed map 0.9 on the seeds (0.1)."""
    foreground = np.where(np.any(cells, axis=0), 0.95, 0.05) if cells else np.full(shape, 0.05)
    seed = np.where(np.any(seeds, axis=0), 0.9, 0.1) if seeds else np.full(shape, 0.1)
    return np.stack((foreground, seed)).astype(np.float32)


def test_two_touching_disks_are_two_cells():
    shape = (60, 80)
    maps = scene(
        shape,
        [disk(shape, (30, 28), 13), disk(shape, (30, 52), 13)],
        [disk(shape, (30, 28), 5), disk(shape, (30, 52), 5)],
    )
    reference, got = run_both(maps, InstanceConfig())
    assert got.count == 2
    assert foreground_agreement(reference.labels, got.labels) >= 0.98
    assert_well_formed(got, maps[0])


def test_a_blob_without_a_seed_becomes_a_cell():
    shape = (50, 80)
    maps = scene(shape, [disk(shape, (25, 20), 10), disk(shape, (25, 60), 10)], [disk(shape, (25, 20), 4)])
    got = maps_to_instances_torch(torch.from_numpy(maps), InstanceConfig())
    assert got.count == 2
    assert sorted(got.areas.tolist()) == [disk(shape, (25, 20), 10).sum()] * 2


def test_cells_under_min_cell_area_are_dropped():
    shape = (40, 40)
    big, small = disk(shape, (10, 10), 6), disk(shape, (30, 30), 3)  # ~113 and ~29 pixels
    maps = scene(shape, [big, small], [disk(shape, (10, 10), 2), disk(shape, (30, 30), 2)])
    assert maps_to_instances_torch(torch.from_numpy(maps), InstanceConfig(min_cell_area=10)).count == 2
    kept = maps_to_instances_torch(torch.from_numpy(maps), InstanceConfig(min_cell_area=60))
    assert kept.count == 1 and kept.areas.tolist() == [big.sum()]
    assert kept.labels[small].max() == 0


def test_an_empty_map_gives_no_cells():
    maps = scene((32, 48), [], [])
    got = maps_to_instances_torch(torch.from_numpy(maps), InstanceConfig())
    assert got.count == 0 and not got.labels.any()
    assert_well_formed(got, maps[0])


def test_components_equal_scipys_numbering_included():
    """4-connected, numbered in raster order of each component's first pixel, on noise and on a serpentine (one
    component ~900 pixels long, where label propagation alone would need a step per pixel of its length)."""
    noise = np.random.default_rng(0).random((64, 80)) > 0.45
    serpentine = np.zeros((41, 41), dtype=bool)
    serpentine[::2] = True
    serpentine[1::4, -1] = serpentine[3::4, 0] = True  # joins each row to the next, at alternate ends
    for mask in (noise, serpentine, np.zeros((5, 7), dtype=bool)):
        expected, count = ndimage.label(mask)
        labels, got_count = _components(torch.from_numpy(mask))
        assert got_count == count
        np.testing.assert_array_equal(labels.numpy(), expected)

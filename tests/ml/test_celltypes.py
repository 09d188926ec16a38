"""The classifier that reads an image's cell type from the maps, and the features it reads."""

import json

import numpy as np
import pytest
import torch

from app.ml.celltypes import CellTypeClassifier, image_contrast, map_features
from app.ml.postprocess import InstanceConfig
from tests.conftest import disk


def scene(radius: float, count: int, shape: tuple[int, int] = (200, 300)) -> np.ndarray:
    """(2, H, W) maps (foreground, seed) of `count` separate disks of `radius` on a grid."""
    foreground = np.zeros(shape, dtype=np.float32)
    seed = np.zeros(shape, dtype=np.float32)
    columns = int(np.ceil(np.sqrt(count * shape[1] / shape[0])))
    step = (shape[0] // -(-count // columns), shape[1] // columns)
    for index in range(count):
        centre = (step[0] * (index // columns) + step[0] / 2, step[1] * (index % columns) + step[1] / 2)
        foreground[disk(shape, centre, radius)] = 0.9
        seed[disk(shape, centre, radius / 2)] = 0.9
    return np.stack([foreground, seed])


def features(maps: np.ndarray, contrast: float = 0.05) -> np.ndarray:
    return map_features(maps, contrast, InstanceConfig())


def test_features_do_not_depend_on_the_image_size():
    # Twice the area with twice the cells; the image's own border, which counts as edge, is where the cells are not.
    np.testing.assert_allclose(features(scene(6, 12)), features(np.concatenate([scene(6, 12)] * 2, axis=1)), rtol=1e-6)


def test_features_are_the_same_from_a_tensor():
    maps = scene(6, 12)
    np.testing.assert_allclose(features(torch.from_numpy(maps)), features(maps), rtol=1e-12)


def test_features_say_small_cells_have_more_edge_for_their_area():
    small, large = features(scene(4, 60)), features(scene(14, 5))
    assert small[1] > large[1] and small[2] > large[2]  # foreground and seed edge shares


def test_the_classifier_tells_few_large_cells_from_many_small_ones():
    rng = np.random.default_rng(0)
    kinds = {"big": (14, 6), "small": (4, 60)}
    examples, types = [], []
    for name, (radius, count) in kinds.items():
        for _ in range(4):
            examples.append(features(scene(radius * rng.uniform(0.8, 1.2), int(count * rng.uniform(0.7, 1.3)))))
            types.append(name)
    classifier = CellTypeClassifier.fit(np.stack(examples), types)
    for name, (radius, count) in kinds.items():
        cell_type, probability = classifier.predict(features(scene(radius, count)))
        assert cell_type == name and 0.9 < probability <= 1.0
    assert CellTypeClassifier.from_dict(json.loads(json.dumps(classifier.to_dict()))) == classifier


def test_a_classifier_written_with_other_features_is_refused():
    data = CellTypeClassifier(["a"], [[0.0] * 5], [0.0] * 5, [1.0] * 5).to_dict()
    with pytest.raises(ValueError, match="features"):
        CellTypeClassifier.from_dict({**data, "features": ["mean intensity"]})


def test_the_classifier_tells_a_faint_image_from_a_bright_one_with_the_same_cells():
    maps = scene(6, 12)
    rng = np.random.default_rng(1)
    contrasts = {"faint": 0.03, "bright": 0.06}
    examples = [features(maps, c * rng.uniform(0.9, 1.1)) for c in contrasts.values() for _ in range(3)]
    classifier = CellTypeClassifier.fit(np.stack(examples), [name for name in contrasts for _ in range(3)])
    for name, contrast in contrasts.items():
        assert classifier.predict(features(maps, contrast))[0] == name


def test_the_contrast_is_the_same_for_8_bit_and_12_bit_pixels_of_one_scene():
    scene8 = np.random.default_rng(2).integers(20, 200, (64, 64)) / 255.0
    assert image_contrast(scene8) == pytest.approx(image_contrast(scene8 * 255.0 * 16 / 65535.0))

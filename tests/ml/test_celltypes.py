"""The per-cell-type instance step: the classifier that reads an image's type from the maps, and the rules."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from app.ml.celltypes import RETIRED_FEATURES, CellTypeClassifier, InstanceRules, image_contrast, map_features
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


def test_the_rules_use_the_thresholds_of_the_type_the_classifier_picks():
    maps = scene(5, 20)
    classifier = CellTypeClassifier.fit(np.stack([features(maps), features(scene(15, 3))]), ["small", "big"])
    plain = InstanceRules(InstanceConfig(), {}, classifier)
    found = plain.find(maps, 0.05)
    assert (found.cell_type, found.count) == ("small", 20) and found.cell_type_probability > 0.9
    # Thresholds of the small type's own drop every cell under 100 pixels, those of another type change nothing.
    assert plain.for_cell_type("small", InstanceConfig(min_cell_area=100)).find(maps, 0.05).count == 0
    assert plain.for_cell_type("big", InstanceConfig(min_cell_area=100)).find(maps, 0.05).count == 20
    # A pick the classifier is not sure enough of keeps the default thresholds, and is still reported.
    unsure = replace(plain.for_cell_type("small", InstanceConfig(min_cell_area=100)), min_probability=1.01)
    assert (unsure.find(maps, 0.05).count, unsure.find(maps, 0.05).cell_type) == (20, "small")
    # The caller's overrides beat every type's thresholds.
    strict = plain.for_cell_type("small", InstanceConfig(min_cell_area=100)).with_overrides(min_cell_area=10)
    assert strict.find(maps, 0.05).count == 20


def test_rules_round_trip_through_the_model_card_and_read_cards_without_them():
    rules = InstanceRules(
        InstanceConfig(seed_threshold=0.7),
        {"astro": InstanceConfig(min_cell_area=128)},
        CellTypeClassifier(["astro", "cort"], [[0.0, 1.0, 0, 0, 0], [1.0, 0.0, 0, 0, 0]], [0.0] * 5, [1.0] * 5),
    )
    assert InstanceRules.from_dict(json.loads(json.dumps(rules.to_dict()))) == rules
    old_card = InstanceConfig(seed_threshold=0.7).to_dict()  # models written before per-type rules
    assert InstanceRules.from_dict(old_card) == InstanceRules(InstanceConfig(seed_threshold=0.7))
    assert InstanceRules().find(scene(5, 4), 0.05).cell_type is None


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


@pytest.mark.parametrize("retired", RETIRED_FEATURES)
def test_a_classifier_of_retired_features_is_set_aside_with_a_warning(caplog, retired):
    rules = InstanceRules(
        InstanceConfig(seed_threshold=0.7),
        {"astro": InstanceConfig(min_cell_area=128)},
        CellTypeClassifier(["astro"], [[0.0] * 4], [0.0] * 4, [1.0] * 4),
    ).to_dict()
    rules["cell_type_classifier"]["features"] = list(retired)
    assert InstanceRules.from_dict(rules) == InstanceRules(InstanceConfig(seed_threshold=0.7))
    assert "tune --model" in caplog.text


def test_the_contrast_is_the_same_for_8_bit_and_12_bit_pixels_of_one_scene():
    scene8 = np.random.default_rng(2).integers(20, 200, (64, 64)) / 255.0
    assert image_contrast(scene8) == pytest.approx(image_contrast(scene8 * 255.0 * 16 / 65535.0))

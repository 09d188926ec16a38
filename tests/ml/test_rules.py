"""The rules of the instance step: the thresholds of the type the classifier picks, and the model card's record."""

import json
from dataclasses import replace

import numpy as np
import pytest

from app.ml.celltypes import RETIRED_FEATURES, CellTypeClassifier
from app.ml.postprocess import InstanceConfig
from app.ml.rules import InstanceRules
from tests.ml.test_celltypes import features, scene


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

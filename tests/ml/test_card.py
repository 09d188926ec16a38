"""model.json is written and read only through ModelCard: every key is read back, unknown keys and unknown
formats are refused with their names, and the weights file must live in the model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.ml.card import FORMAT_VERSION, ModelCard
from app.ml.checkpoint import MODEL_JSON, load_checkpoint, read_card
from app.ml.errors import CheckpointError

BUNDLED = Path(__file__).parents[2] / "model_store" / "sartorius-w16-v3"


def bundled_card() -> dict:
    return json.loads((BUNDLED / MODEL_JSON).read_text())


def test_a_card_reads_back_equal_to_what_was_written():
    card = ModelCard.from_dict(bundled_card())
    assert ModelCard.from_dict(card.to_dict()) == card
    assert card.to_dict() == bundled_card()  # the bundled card is written in the current format, nothing lost


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ((), "model.json"),
        (("preprocessing",), "preprocessing"),
        (("inference",), "inference"),
        (("architecture",), "architecture"),
        (("postprocessing", "per_cell_type", "astro"), "postprocessing.per_cell_type.astro"),
        (("postprocessing", "cell_type_classifier"), "postprocessing.cell_type_classifier"),
        (("training", "data"), "training.data"),
    ],
)
def test_an_unknown_key_is_refused_with_its_section_and_name(section, where):
    card = bundled_card()
    target = card
    for key in section:
        target = target[key]
    target["colour_map"] = "viridis"
    with pytest.raises(ValueError, match=rf"'{where}' has unknown keys \['colour_map'\]"):
        ModelCard.from_dict(card)


def test_the_instance_step_for_tta_is_read_back_and_picked_by_view_count():
    card = bundled_card()
    chosen_for_4 = {**card["postprocessing"], "foreground_threshold": 0.55}
    card["postprocessing_by_tta"] = {"4": chosen_for_4}
    read = ModelCard.from_dict(card)
    assert read.to_dict() == card
    assert read.rules_for_tta(4).to_dict() == chosen_for_4
    assert read.rules_for_tta(8) == read.rules_for_tta(1) == read.postprocessing  # none chosen for 8: the one without


def test_a_tta_key_that_is_no_view_count_is_refused():
    card = {**bundled_card(), "postprocessing_by_tta": {"3": bundled_card()["postprocessing"]}}
    with pytest.raises(ValueError, match=r"'postprocessing_by_tta' has unknown keys \['3'\]"):
        ModelCard.from_dict(card)


def test_a_version_2_card_has_no_instance_step_for_tta():
    card = bundled_card()
    card["format_version"] = 2
    del card["postprocessing_by_tta"]
    assert ModelCard.from_dict(card).postprocessing_by_tta == {}


def test_a_newer_format_is_refused_with_what_to_do():
    card = {**bundled_card(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match="written by a newer cellseg; upgrade cellseg"):
        ModelCard.from_dict(card)


def test_a_version_1_card_is_read_without_the_keys_nothing_read():
    card = bundled_card()
    card["format_version"] = 1
    card["preprocessing"]["normalization"] = "zscore"
    card["inference"]["default_mode"] = "resize"
    assert ModelCard.from_dict(card) == ModelCard.from_dict(bundled_card())
    card["preprocessing"]["normalization"] = "minmax"
    with pytest.raises(ValueError, match="only 'zscore' was ever supported"):
        ModelCard.from_dict(card)


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "..", "sub/weights.safetensors"])
def test_the_weights_file_must_be_a_file_in_the_model_folder(tmp_path, name):
    folder = tmp_path / "model"
    folder.mkdir()
    card = bundled_card()
    card["weights"]["file"] = name
    (folder / MODEL_JSON).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="must be a file name in"):
        load_checkpoint(folder)


def test_a_broken_card_names_the_file_and_the_problem(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / MODEL_JSON).write_text(json.dumps({**bundled_card(), "inference": {"half_precision": True, "x": 1}}))
    with pytest.raises(CheckpointError, match=r"model\.json: 'inference' has unknown keys \['x'\]"):
        read_card(folder)

"""The default model shipped in model_store/: small, verified, and honest about its score."""

from __future__ import annotations

import json
import re

import pytest

from app.evaluate import main as evaluate
from app.ml.checkpoint import default_version, load_checkpoint, resolve_model_folder
from tests.conftest import MODEL_STORE as STORE
from tests.conftest import REPO


def bundled_card() -> dict:
    return json.loads((resolve_model_folder(STORE) / "model.json").read_text())


def test_the_store_names_a_default_model_that_loads_and_is_small():
    version = default_version(STORE)
    folder = resolve_model_folder(STORE, version)
    checkpoint = load_checkpoint(folder)  # verifies the sha256 recorded in model.json
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20 * 1024 * 1024
    assert checkpoint.architecture.padded and checkpoint.architecture.base_width == 16
    assert checkpoint.preprocess.input_size == 572
    assert not (folder / "last.pt").exists(), "the resume state is not shipped"


def test_model_json_records_how_it_was_trained(sartorius):
    card = bundled_card()
    args = card["training"]["args"]
    assert args["holdout_rows"] == 0.2 and args["reference_size"] == "520x704"
    assert card["training"]["data"]["split"]["kind"] == "rows"
    assert card["training"]["summary"]["steps"] > 0
    assert card["preprocessing"]["pixel_scale"] == pytest.approx([572 / 520, 572 / 704])


@pytest.mark.slow
def test_evaluate_on_the_held_out_rows_prints_the_score_in_model_json_and_the_readme(sartorius, capsys):
    folder = resolve_model_folder(STORE)
    evaluate(["--model", str(folder), "--data", str(sartorius), "--subset", "validation"])
    printed = capsys.readouterr().out
    score = float(re.search(r"^score (\d\.\d{4}) on 1 image", printed, re.M).group(1))
    assert score == pytest.approx(bundled_card()["metrics"]["validation"]["score"], abs=5e-5)
    assert f"{score:.4f}" in (REPO / "README.md").read_text()

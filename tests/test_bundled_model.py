"""The default model shipped in model_store/: small, verified, trained on every cell type, and honest about its score.

Its validation images were never trained on. `evaluate` reproduces the score in its model.json, and the service,
posting each image over HTTP as a lab tool would, finds the same cells.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import httpx
import numpy as np
import pytest

from app.bench.localserver import running_server
from app.evaluate import main as evaluate
from app.ml import rle
from app.ml.checkpoint import default_version, load_checkpoint, resolve_model_folder
from app.ml.data.labelled import open_labelled
from app.ml.data.split import Split, load_split
from app.ml.scoring.metric import score_per_threshold
from tests.conftest import MODEL_STORE as STORE
from tests.conftest import REPO

CELL_TYPES = {"astro", "cort", "shsy5y"}


def bundled_card() -> dict:
    return json.loads((resolve_model_folder(STORE) / "model.json").read_text())


def validation_samples(reconstructed, sartorius) -> list:
    split = Split.from_dict(bundled_card()["training"]["data"]["split"])
    return load_split(open_labelled([reconstructed, sartorius]), split)[1]


def test_the_store_names_a_default_model_that_loads_and_is_small():
    folder = resolve_model_folder(STORE, default_version(STORE))
    checkpoint = load_checkpoint(folder)  # verifies the sha256 recorded in model.json
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20 * 1024 * 1024
    assert checkpoint.architecture.padded and checkpoint.preprocess.input_size == 572
    assert not (folder / "last.pt").exists(), "the resume state is not shipped"
    assert (folder / "README.md").is_file(), "the model's own write-up"


def test_model_json_records_how_it_was_trained_and_how_it_scores_per_cell_type():
    card = bundled_card()
    assert card["training"]["args"]["reference_size"] == "520x704"
    assert card["preprocessing"]["pixel_scale"] == pytest.approx([572 / 520, 572 / 704])
    data = card["training"]["data"]
    assert [p.split("/")[-1] for p in data["paths"]] == ["sartorius-reconstructed", "sartorius"]
    assert data["images"] == 44 and data["split"]["kind"] == "sample"
    assert set(data["split"]["train"]).isdisjoint(data["split"]["val"]) and len(data["split"]["val"]) >= 8
    validation = card["metrics"]["validation"]
    assert set(validation["per_cell_type"]) == CELL_TYPES
    assert set(card["postprocessing"]["cell_type_classifier"]["types"]) == CELL_TYPES


def test_the_validation_split_covers_every_cell_type(reconstructed, sartorius):
    types = Counter(sample.cell_type for sample in validation_samples(reconstructed, sartorius))
    assert set(types) == CELL_TYPES and sum(types.values()) >= 8


@pytest.mark.slow
def test_evaluate_on_the_validation_images_prints_the_score_in_model_json(reconstructed, sartorius, capsys):
    folder = resolve_model_folder(STORE)
    evaluate(["--model", str(folder), "--data", str(reconstructed), str(sartorius), "--subset", "validation"])
    printed = capsys.readouterr().out
    score = float(re.search(r"^score (\d\.\d{4}) on \d+ image", printed, re.M).group(1))
    card = bundled_card()
    assert score == pytest.approx(card["metrics"]["validation"]["score"], abs=5e-5)
    for cell_type, value in card["metrics"]["validation"]["per_cell_type"].items():
        assert re.search(rf"^  {cell_type}\s+{value:.4f}  SEG \d\.\d{{4}}$", printed, re.M)
    assert f"{score:.4f}" in (folder / "README.md").read_text()
    assert f"{score:.4f}" in (REPO / "docs" / "training.md").read_text()


@pytest.mark.slow
def test_the_service_scores_what_evaluate_scores(reconstructed, sartorius, tmp_path):
    """The served path (upload, decode, resize, network, instance step with the cell type, RLE JSON) finds the
    cells that evaluate scores, in the same precision (float32)."""
    samples = validation_samples(reconstructed, sartorius)
    card = bundled_card()
    expected = {row["id"]: row for row in card["metrics"]["validation"]["per_image"]}
    settings = {"model_store": str(STORE), "half_precision": "false", "compile": "false", "torch_threads": "2"}
    scores = []
    with running_server(tmp_path / "server.log", timeout=300, **settings) as server:
        for sample in samples:
            png = reconstructed if (reconstructed / "train" / f"{sample.image_id}.png").exists() else sartorius
            data = (png / "train" / f"{sample.image_id}.png").read_bytes()
            body = httpx.post(f"{server.url}/segment", files={"file": ("a.png", data)}, timeout=120).json()
            labels = np.zeros(sample.labels.shape, dtype=np.int32)
            for cell in body["cells"]:
                labels[rle.decode(cell["rle"], sample.labels.shape)] = cell["id"]
            scores.append(score_per_threshold(sample.labels, labels).mean())
            assert body["cell_type"] == expected[sample.image_id]["predicted_cell_type"]
            assert scores[-1] == pytest.approx(expected[sample.image_id]["score"], abs=0.01)
    assert np.mean(scores) == pytest.approx(card["metrics"]["validation"]["score"], abs=0.002)

"""The teaching loop of a lab, end to end, with a real server and real files: segment images with the default model,
save its ROI set, GeoJSON and label TIFF, correct them as a person would in Fiji or QuPath (delete the false cells,
split the merged ones), fine-tune the default model on the corrected files with `train --init`, load the new version
into the running service without a restart, and segment again with model=: the corrections are learnt.

The images are synthetic phase-contrast scenes whose true cells are known, so the "person" knows which cells the
model got wrong: those covering no true cell (false) and those covering two or more (merged)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import roifile
import tifffile

from app.bench.localserver import running_server
from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from app.ml.outputs import cell_outlines
from app.ml.scoring.metric import overlaps
from app.train import main as train
from tests.api.conftest import png
from tests.conftest import MODEL_STORE

pytestmark = pytest.mark.slow

DEFAULT = "sartorius-w16-v3"
SEEDS = (0, 1, 2)


def mistakes(truth: np.ndarray, found: np.ndarray) -> tuple[list[int], dict[int, list[int]]]:
    """The found cells a person would correct: false ones (less than a fifth of them on any true cell) and merged
    ones (each covering more than half of two or more true cells, listed)."""
    shared, true_areas, found_areas = overlaps(truth, found)
    false = [j + 1 for j in range(shared.shape[1]) if shared[:, j].max(initial=0) < 0.2 * found_areas[0, j]]
    covers = shared > 0.5 * true_areas
    merged = {j + 1: list(np.flatnonzero(covers[:, j]) + 1) for j in range(shared.shape[1]) if covers[:, j].sum() > 1}
    return false, merged


def outline_of(mask: np.ndarray) -> np.ndarray:
    """The (N, 2) x, y outline a person draws around one cell."""
    return next(cell_outlines(mask.astype(np.int32)))[1]


def corrected_rois(rois: Path, truth: np.ndarray, false: list[int], merged: dict[int, list[int]]) -> list:
    """Fiji's ROI Manager: delete the false cells' ROIs and the merged ones', draw each part of a merged cell."""
    kept = [roi for roi in roifile.roiread(rois) if int(roi.name.split("-")[1]) not in {*false, *merged}]
    drawn = [
        roifile.ImagejRoi.frompoints(outline_of(truth == part)[:-1], name=f"part-{part}")
        for parts in merged.values()
        for part in parts
    ]
    return kept + drawn


def corrected_geojson(document: bytes, truth: np.ndarray, false: list[int], merged: dict[int, list[int]]) -> dict:
    """QuPath: delete the false and merged detections, draw each part of a merged cell as a new one."""
    collection = json.loads(document)
    collection["features"] = [f for f in collection["features"] if f["properties"]["id"] not in {*false, *merged}]
    for parts in merged.values():
        for part in parts:
            polygon = {"type": "Polygon", "coordinates": [outline_of(truth == part).tolist()]}
            collection["features"].append({"type": "Feature", "geometry": polygon, "properties": {}})
    return collection


def corrected_labels(labels: np.ndarray, truth: np.ndarray, false: list[int], merged: dict[int, list[int]]):
    """Fiji, painting on the label image: the false cells erased, each merged cell repainted as its parts."""
    labels = labels.copy()
    labels[np.isin(labels, [*false, *merged])] = 0
    for parts in merged.values():
        for part in parts:
            labels[truth == part] = labels.max() + 1
    return labels


def segment(http: httpx.Client, image: bytes, model: str | None = None, format: str = "tiff") -> httpx.Response:
    params = {"format": format, **({"model": model} if model else {})}
    answer = http.post("/segment", params=params, files={"file": ("cells.png", image, "image/png")})
    assert answer.status_code == 200, answer.text
    return answer


def test_a_lab_corrects_the_services_own_files_teaches_it_and_serves_the_new_model_without_a_restart(tmp_path: Path):
    store, lab = tmp_path / "model_store", tmp_path / "lab"
    shutil.copytree(MODEL_STORE / DEFAULT, store / DEFAULT)
    (store / "DEFAULT").write_text(f"{DEFAULT}\n")
    lab.mkdir()
    scenes = [generate_image(np.random.default_rng(seed), 256, 256, "cort") for seed in SEEDS]
    images = [png(to_uint8(scene.image)) for scene in scenes]
    settings = {"model_store": str(store), "compile": "false", "torch_threads": "2", "max_wait_ms": "0"}
    with (
        running_server(tmp_path / "server.log", **settings) as server,
        httpx.Client(base_url=server.url, timeout=300) as http,
    ):
        before, corrections = [], 0
        for number, (scene, image) in enumerate(zip(scenes, images, strict=True)):
            answer = segment(http, image)
            assert answer.headers["X-Model-Version"] == DEFAULT
            found = tifffile.imread(io.BytesIO(answer.content)).astype(np.int32)
            false, merged = mistakes(scene.labels, found)
            before.append((len(false), len(merged)))
            corrections += len(false) + len(merged)
            name = f"plate-{number}"
            (lab / f"{name}.png").write_bytes(image)
            if number == 0:  # a Fiji ROI set, corrected in the ROI Manager
                downloaded = tmp_path / f"{name}-rois.zip"
                downloaded.write_bytes(segment(http, image, format="roi").content)
                rois = corrected_rois(downloaded, scene.labels, false, merged)
                roifile.roiwrite(lab / f"{name}.zip", rois)
            elif number == 1:  # GeoJSON, corrected in QuPath
                document = corrected_geojson(
                    segment(http, image, format="geojson").content, scene.labels, false, merged
                )
                (lab / f"{name}.geojson").write_text(json.dumps(document))
            else:  # the label TIFF, repainted in Fiji and saved beside the image
                tifffile.imwrite(lab / f"{name}_masks.tif", corrected_labels(found, scene.labels, false, merged))
        assert corrections >= 20, before  # the default model gets these scenes visibly wrong

        base = store / DEFAULT
        train(f"--init {base} --data {lab} --out {store} --version lab-v1 --epochs 25 --folds 2".split())

        loaded = http.post("/models/lab-v1/load")
        assert loaded.status_code == 200, loaded.text
        assert "lab-v1" in [model["version"] for model in http.get("/models").json()["loaded"]]
        after = []
        for scene, image in zip(scenes, images, strict=True):
            answer = segment(http, image, model="lab-v1")
            assert answer.headers["X-Model-Version"] == "lab-v1"
            false, merged = mistakes(scene.labels, tifffile.imread(io.BytesIO(answer.content)).astype(np.int32))
            after.append((len(false), len(merged)))
        # The default model still answers as before, beside the new one.
        assert segment(http, images[0]).headers["X-Model-Version"] == DEFAULT

    false_before, merged_before = np.sum(before, axis=0)
    false_after, merged_after = np.sum(after, axis=0)
    assert false_after <= false_before / 2, (before, after)
    assert merged_after <= merged_before / 2, (before, after)
    card = json.loads((store / "lab-v1" / "model.json").read_text())
    assert card["training"]["started_from"]["version"] == DEFAULT
    assert set(card["training"]["data"]["layouts"].values()) == {"geojson+pairs+roi"}

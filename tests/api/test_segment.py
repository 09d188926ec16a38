"""POST /segment end to end, through a real uvicorn process and an httpx client."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import roifile
import tifffile
from PIL import Image
from pycocotools import mask as coco_mask

from app.ml import rle
from app.ml.scoring.metric import image_score
from tests.api.conftest import png, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_image(sartorius) -> bytes:
    return (sartorius / "test" / "7ae19de7bc2a.png").read_bytes()


def decode_cells(body: dict) -> np.ndarray:
    """Every cell's RLE painted into one label map; fails if any two cells share a pixel."""
    shape = (body["height"], body["width"])
    labels = np.zeros(shape, dtype=np.int32)
    for cell in body["cells"]:
        mask = rle.decode(cell["rle"], shape)
        assert not (labels[mask] > 0).any(), f"cell {cell['id']} overlaps another"
        assert mask.sum() == cell["area"]
        labels[mask] = cell["id"]
    return labels


def test_a_real_test_image_comes_back_as_non_overlapping_rles_of_520x704(client, real_image):
    response = client.post("/segment", files={"file": ("7ae19de7bc2a.png", real_image, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["height"], body["width"]) == (520, 704)
    # auto mode tiles it: the test model was trained on 256x256 images at their own scale
    assert body["filename"] == "7ae19de7bc2a.png" and body["mode"] == "tile"
    assert body["model_version"] == "synth-v1"
    assert body["cell_count"] == len(body["cells"]) > 0
    # The fixture's model learnt three cell types: it names one, with the classifier's probability.
    assert body["cell_type"] in {"shsy5y", "astro", "cort"} and 1 / 3 < body["cell_type_probability"] <= 1
    labels = decode_cells(body)
    for cell in body["cells"]:
        x, y, w, h = cell["bbox"]
        rows, cols = np.nonzero(labels == cell["id"])
        assert (rows.min(), cols.min(), rows.max() + 1 - y, cols.max() + 1 - x) == (y, x, h, w)
        assert 0 < cell["score"] <= 1
    assert set(body["timings"]) == {"decode_ms", "preprocess_ms", "network_ms", "instances_ms", "encode_ms"}


def test_the_png_output_is_a_16_bit_label_image_that_matches_the_json(client, real_image):
    as_json = client.post("/segment", files={"file": ("a.png", real_image)}).json()
    response = client.post("/segment", params={"format": "png"}, files={"file": ("a.png", real_image)})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    labels = np.asarray(Image.open(io.BytesIO(response.content)))
    assert labels.shape == (520, 704) and labels.dtype == np.uint16
    assert np.array_equal(labels, decode_cells(as_json))
    assert response.headers["x-cell-type"] == as_json["cell_type"]
    assert response.headers["x-cell-count"] == str(as_json["cell_count"])
    assert "network;dur=" in response.headers["server-timing"]


def test_mask_and_overlay_formats(client, real_image):
    mask = client.post("/segment", params={"format": "mask"}, files={"file": ("a.png", real_image)})
    overlay = client.post("/segment", params={"format": "overlay"}, files={"file": ("a.png", real_image)})
    mask_image = np.asarray(Image.open(io.BytesIO(mask.content)))
    overlay_image = Image.open(io.BytesIO(overlay.content))
    assert mask_image.shape == (520, 704) and set(np.unique(mask_image)) <= {0, 255}
    assert overlay_image.size == (704, 520) and overlay_image.mode == "RGB"


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_a_1040x1408_image_works_in_both_modes(client, real_image, mode):
    big = Image.open(io.BytesIO(real_image)).resize((1408, 1040))
    response = client.post("/segment", params={"mode": mode}, files={"file": ("big.png", png(np.asarray(big)))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["height"], body["width"], body["mode"]) == (1040, 1408, mode)
    assert decode_cells(body).shape == (1040, 1408)


FLOAT32_SERVERS = [
    ({"backend": "onnxruntime"}, ("onnxruntime", "float32")),
    ({"backend": "torch", "half_precision": "false"}, ("torch", "float32")),
]


@pytest.mark.parametrize(("settings", "served"), FLOAT32_SERVERS)
def test_every_backend_and_precision_serves_the_same_cells(client, real_image, trained_model, settings, served):
    """The session's server runs what backend auto picks here; these run the float32 alternatives."""
    with running_server(trained_model.parent, **settings) as url:
        ready = httpx.get(f"{url}/ready").json()
        assert (ready["backend"], ready["precision"]) == served
        other = httpx.post(f"{url}/segment", files={"file": ("a.png", real_image)}, timeout=120).json()
    shipped = client.post("/segment", files={"file": ("a.png", real_image)}).json()
    assert other["cell_count"] > 5
    assert image_score(decode_cells(other), decode_cells(shipped)) > 0.9


def test_a_16_bit_tiff_gives_the_same_cells_as_the_8_bit_png(client, real_image):
    pixels = np.asarray(Image.open(io.BytesIO(real_image)))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels.astype(np.uint16) * 257)
    from_tiff = client.post("/segment", files={"file": ("a.tif", buffer.getvalue(), "image/tiff")}).json()
    from_png = client.post("/segment", files={"file": ("a.png", real_image)}).json()
    assert (from_tiff["height"], from_tiff["width"]) == (520, 704)
    assert [c["rle"] for c in from_tiff["cells"]] == [c["rle"] for c in from_png["cells"]]


def test_an_rgb_image_of_another_size_keeps_its_size(client, real_image):
    gray = np.asarray(Image.open(io.BytesIO(real_image)))[:300, :411]
    rgb = np.stack([gray, gray, gray], axis=-1)
    body = client.post("/segment", files={"file": ("rgb.png", png(rgb))}).json()
    assert (body["height"], body["width"]) == (300, 411)


def test_several_files_in_one_request(client, real_image, sartorius):
    second = (sartorius / "test" / "d48ec7815252.png").read_bytes()
    response = client.post("/segment", files=[("files", ("a.png", real_image)), ("files", ("b.png", second))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["filename"] for r in body["results"]] == ["a.png", "b.png"]
    assert body["model_version"] == "synth-v1"
    for result in body["results"]:
        assert decode_cells(result).shape == (520, 704)


def test_thresholds_can_be_overridden_within_range(client, real_image):
    strict = client.post("/segment", params={"min_cell_area": 400}, files={"file": ("a.png", real_image)}).json()
    loose = client.post("/segment", params={"min_cell_area": 1}, files={"file": ("a.png", real_image)}).json()
    assert strict["cell_count"] < loose["cell_count"]
    assert all(c["area"] >= 400 for c in strict["cells"])


def test_the_request_id_is_returned_and_a_given_one_is_kept(client):
    assert len(client.get("/health").headers["x-request-id"]) == 32
    assert client.get("/health", headers={"X-Request-ID": "lab-42"}).headers["x-request-id"] == "lab-42"


def test_the_lab_formats_read_back_with_their_own_libraries_as_the_same_cells(client, real_image, tmp_path):
    def post(output: str) -> httpx.Response:
        answer = client.post("/segment", params={"format": output}, files={"file": ("a.png", real_image)})
        assert answer.status_code == 200, answer.text
        return answer

    labels = np.asarray(Image.open(io.BytesIO(post("png").content)))
    tiff = post("tiff")
    assert tiff.headers["content-type"] == "image/tiff"
    assert np.array_equal(tifffile.imread(io.BytesIO(tiff.content)), labels)
    annotations = json.loads(post("coco").content)["annotations"]
    assert len(annotations) == labels.max()
    for annotation in annotations:
        rle_ = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        assert np.array_equal(coco_mask.decode(rle_).astype(bool), labels == annotation["id"])
    features = json.loads(post("geojson").content)["features"]
    assert post("geojson").headers["content-type"] == "application/geo+json"
    assert sorted(f["properties"]["id"] for f in features) == list(range(1, labels.max() + 1))
    (tmp_path / "cells.zip").write_bytes(post("roi").content)
    assert len(roifile.roiread(tmp_path / "cells.zip")) == labels.max()


def test_auto_mode_resizes_images_of_the_trained_size_and_tiles_larger_ones_and_says_so(client, real_image):
    # The test model was trained on 256x256 images at their own pixel scale, resized to 256 in resize mode.
    crop = np.asarray(Image.open(io.BytesIO(real_image)))[:256, :256]
    as_trained = client.post("/segment", files={"file": ("a.png", png(crop))}).json()
    assert as_trained["mode"] == "resize"  # auto is the default
    answer = client.post("/segment", params={"format": "png"}, files={"file": ("big.png", real_image)})
    assert answer.headers["x-mode"] == "tile"
    assert np.asarray(Image.open(io.BytesIO(answer.content))).shape == (520, 704)
    forced = client.post("/segment", params={"mode": "resize"}, files={"file": ("big.png", real_image)}).json()
    assert forced["mode"] == "resize"


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event in the answer."""
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_a_large_image_streams_its_progress_then_the_same_answer(client, real_image):
    large = png(np.tile(np.asarray(Image.open(io.BytesIO(real_image))), (2, 2)))  # 1040x1408: tiles
    stream = {"Accept": "text/event-stream"}
    answer = client.post("/segment", params={"mode": "tile"}, files={"file": ("big.png", large)}, headers=stream)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = read_events(answer)
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}
    done = [data["tiles_done"] for name, data in events if name == "progress"]
    total = events[-2][1]["tiles_total"]
    assert total > 4 and done == sorted(done) and done[-1] == total
    plain = client.post("/segment", params={"mode": "tile"}, files={"file": ("big.png", large)}).json()
    assert [c["rle"] for c in events[-1][1]["cells"]] == [c["rle"] for c in plain["cells"]]

    junk = client.post("/segment", files={"file": ("notes.txt", b"no image here")}, headers=stream)
    (name, data), *_ = read_events(junk)
    assert name == "error" and data["status"] == 415 and "not an image we can read" in data["detail"]
    files_too = client.post("/segment", params={"format": "png"}, files={"file": ("a.png", real_image)}, headers=stream)
    assert files_too.status_code == 400 and "progress events come with format=json" in files_too.json()["detail"]

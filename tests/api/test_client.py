"""The Python client (app.client) against the real service: the same cells as a raw request, labels equal to the
PNG answer, every kind of input, the service's refusals, the API key, and retries while the service starts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from app.bench.localserver import free_port
from app.client import AsyncCellsegClient, CellsegClient, SegmentResult, ServiceError
from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from tests.api.conftest import png

pytestmark = pytest.mark.slow

GRAY = to_uint8(generate_image(np.random.default_rng(5), 256, 256, "cort").image)  # 256x256, as trained
KEY = "secret"


def without_timings(body: dict) -> dict:
    return {name: value for name, value in body.items() if name not in ("timings", "filename")}


async def segment_async(url: str, image: bytes | np.ndarray, **client_options: Any) -> SegmentResult:
    async with AsyncCellsegClient(url, **client_options) as cellseg:
        return await cellseg.segment(image)


def test_sync_and_async_clients_answer_the_same_cells_as_a_raw_post(server):
    raw = httpx.post(f"{server}/segment", files={"file": ("cells.png", png(GRAY))}, timeout=120)
    assert raw.status_code == 200, raw.text
    expected = raw.json()
    with CellsegClient(server) as cellseg:
        synced = cellseg.segment(png(GRAY))
    for result in (synced, asyncio.run(segment_async(server, png(GRAY)))):
        assert result.cells == expected["cells"] and result.cell_count == len(expected["cells"]) > 0
        assert (result.width, result.height) == (256, 256)
        assert (result.mode, result.cell_type) == (expected["mode"], expected["cell_type"])
        assert without_timings(result.raw) == without_timings(expected)


def test_labels_equal_the_png_label_image_and_a_stack_gives_one_per_frame(server, tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([GRAY, np.fliplr(GRAY)]), metadata={"axes": "ZYX"})
    with CellsegClient(server) as cellseg:
        labels = cellseg.labels(GRAY)
        answered = np.asarray(Image.open(io.BytesIO(cellseg.segment(GRAY, format="png"))))
        frames = cellseg.labels(stack)
        saved = cellseg.save(stack, tmp_path / "labels.tif")  # the format from the name: a label TIFF
    assert labels.dtype == np.uint16 and labels.shape == (256, 256) and labels.max() > 0
    np.testing.assert_array_equal(labels, answered)
    assert frames.shape == (2, 256, 256) and frames.dtype == np.uint16
    np.testing.assert_array_equal(frames, tifffile.imread(saved))


def test_an_array_a_path_and_bytes_give_the_same_cells(server, tmp_path):
    path = tmp_path / "cells.png"
    path.write_bytes(png(GRAY))
    floats = GRAY / 255.0
    float_tiff = io.BytesIO()
    tifffile.imwrite(float_tiff, floats.astype(np.float32))
    inputs = [GRAY, path, str(path), path.read_bytes(), GRAY.astype(np.uint16) * 257]
    with CellsegClient(server) as cellseg:
        answers = [cellseg.segment(image).cells for image in inputs]
        # The service stretches a float image's min..max: a float array is read as the float TIFF of its values.
        as_floats = cellseg.segment(floats).cells, cellseg.segment(float_tiff.getvalue()).cells
    assert answers[0] and all(cells == answers[0] for cells in answers)
    assert as_floats[0] and as_floats[0] == as_floats[1]


def test_the_services_refusals_raise_cellseg_error_with_its_status_and_detail(server):
    too_high = httpx.post(f"{server}/segment", params={"seed_threshold": "5.0"}, files={"file": png(GRAY)})
    assert too_high.status_code == 422
    with CellsegClient(server) as cellseg:
        with pytest.raises(ServiceError) as refused:
            cellseg.segment(GRAY, seed_threshold=5.0)
        assert refused.value.status == 422 and refused.value.detail == too_high.json()["detail"]
        with pytest.raises(ServiceError, match=r"^cellseg answered 422: the file 'image' is empty; send a PNG"):
            cellseg.segment(b"")
        with pytest.raises(ValueError, match=r"cannot tell the format from 'cells\.bmp'"):
            cellseg.save(GRAY, "cells.bmp")


def requests_answered(url: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics", headers={"X-API-Key": KEY}).text
    pattern = rf'^cellseg_requests_total{{[^}}]*route="/segment"[^}}]*status="{status}"[^}}]*}} (\S+)$'
    return sum(float(count) for count in re.findall(pattern, text, flags=re.MULTILINE))


def wait_until_listening(url: str, process: subprocess.Popen) -> None:
    """Poll /health closely (not with the client, whose retries back off) to catch the service still warming."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"the service did not listen (exit code {process.poll()})")


def test_the_client_waits_for_a_starting_service_and_sends_its_api_key(trained_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Compiling while it warms up keeps the service answering 503 for a while after it listens.
    env = {
        **os.environ,
        "CELLSEG_MODEL_STORE": str(trained_model.parent),
        "CELLSEG_API_KEY": KEY,
        "CELLSEG_TORCH_THREADS": "2",
        "CELLSEG_COMPILE": "true",
    }
    command = [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)]
    with (
        ThreadPoolExecutor(2) as pool,
        CellsegClient(url, api_key=KEY, retries=1000, max_wait=60) as patient,
        CellsegClient(url, api_key=KEY, retries=0) as impatient,
        (tmp_path / "server.log").open("w") as log,
    ):
        waiting = pool.submit(patient.labels, GRAY)  # before the service exists: its connection is refused
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_listening(url, process)
            assert impatient.ready()["ready"] is False
            with pytest.raises(ServiceError) as warming:
                impatient.segment(GRAY)
            assert warming.value.status == 503 and "not ready yet" in warming.value.detail
            # Sent while the service still warms up: answered 503 with Retry-After, it tries again.
            also_waiting = pool.submit(asyncio.run, segment_async(url, GRAY, api_key=KEY, retries=100, max_wait=60))
            assert waiting.result(timeout=120).max() > 0 and also_waiting.result(timeout=120).cell_count > 0
            assert requests_answered(url, 503) >= 2, "a patient client was answered 503 and tried again"
            with CellsegClient(url) as keyless, pytest.raises(ServiceError) as refused:
                keyless.segment(GRAY)
            assert refused.value.status == 401
            assert refused.value.detail == "missing or wrong API key: send it in the X-API-Key header"
            assert impatient.ready()["ready"] and impatient.models()["available"] == ["synth-v1"]
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_the_clients_former_class_names_still_import_with_a_warning():
    with pytest.warns(DeprecationWarning, match="app.client.CellsegError is now ServiceError"):
        from app.client import CellsegError  # noqa: PLC0415
    with pytest.warns(DeprecationWarning, match="app.client.Segmentation is now SegmentResult"):
        from app.client import Segmentation  # noqa: PLC0415
    assert (CellsegError, Segmentation) == (ServiceError, SegmentResult)

"""Health, readiness, models, metrics, docs, the API key, load and overload, against real uvicorn processes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from app.bench.localserver import running_server as start_server
from app.ml.serving.runner import native_bfloat16
from tests.api.conftest import png, running_server

pytestmark = pytest.mark.slow

IMAGE = png(np.random.default_rng(1).integers(0, 256, (200, 240)).astype(np.uint8))


def metric(text: str, name: str) -> float:
    """Sum of every sample of a Prometheus metric (all label sets)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.MULTILINE))


def test_health_ready_and_models(client, trained_model):
    assert client.get("/health").json() == {"status": "ok"}
    # As shipped (backend auto, compile on): PyTorch, compiled, in bfloat16 on CPUs that compute it natively, else
    # in float32.
    precision = "bfloat16" if native_bfloat16() else "float32"
    ready = {
        "ready": True,
        "status": "ready",
        "model_version": "synth-v1",
        "device": "cpu",
        "backend": "torch",
        "precision": precision,
        "compiled": True,
        "tta": 1,
        "loaded": ["synth-v1"],
    }
    assert client.get("/ready").json() == ready
    models = client.get("/models").json()
    assert models["available"] == ["synth-v1"] and models["default"] == "synth-v1"
    [loaded] = models["loaded"]
    assert loaded["version"] == "synth-v1" and loaded["default"] and loaded["ready"] and loaded["compiled"]
    assert loaded["card"]["weights_sha256"] and loaded["card"]["architecture"]["base_width"] == 8
    card = client.get("/models/synth-v1").json()
    assert card["weights"]["sha256"] == loaded["card"]["weights_sha256"]


def test_docs_and_openapi_with_examples(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/segment" in spec["paths"]
    assert spec["components"]["schemas"]["Segmentation"]["examples"]


def test_32_concurrent_requests_all_succeed_and_are_batched(server):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=300) as http:
            posts = [http.post("/segment", files={"file": (f"{i}.png", IMAGE)}) for i in range(32)]
            return await asyncio.gather(*posts)

    before = httpx.get(f"{server}/metrics").text
    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 32
    after = httpx.get(f"{server}/metrics").text
    batches = metric(after, "cellseg_batch_size_count") - metric(before, "cellseg_batch_size_count")
    inputs = metric(after, "cellseg_batch_size_sum") - metric(before, "cellseg_batch_size_sum")
    assert inputs == 32 and batches < 32, "micro-batches larger than 1"
    assert metric(after, 'cellseg_requests_total{method="POST",route="/segment",status="200"}') >= 32
    assert metric(after, "cellseg_request_latency_seconds_count") > 0
    assert metric(after, "cellseg_queue_depth") == 0
    assert 'cellseg_stage_seconds_count{stage="instances"}' in after


def test_a_full_queue_answers_503_with_retry_after_and_recovers(trained_model):
    with running_server(trained_model.parent, max_queue="2", max_batch="1") as url:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as http:
                return await asyncio.gather(
                    *[http.post("/segment", files={"file": ("a.png", IMAGE)}) for _ in range(24)]
                )

        responses = asyncio.run(run())
        statuses = {r.status_code for r in responses}
        assert statuses == {200, 503}
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert "the service is busy" in busy.json()["detail"]
        assert httpx.post(f"{url}/segment", files={"file": ("a.png", IMAGE)}, timeout=60).status_code == 200


def test_clients_that_disconnect_leave_no_work_behind(trained_model):
    large = png(np.random.default_rng(2).integers(0, 256, (600, 600)).astype(np.uint8))  # 25 tiles in tile mode
    with running_server(trained_model.parent, max_batch="1", max_queue="1000") as url:

        async def abandon() -> list:
            async with httpx.AsyncClient(base_url=url, timeout=0.5) as http:
                posts = [
                    http.post("/segment", params={"mode": "tile"}, files={"file": ("a.png", large)}) for _ in range(12)
                ]
                return await asyncio.gather(*posts, return_exceptions=True)

        results = asyncio.run(abandon())
        abandoned = sum(isinstance(r, httpx.TimeoutException) for r in results)
        assert abandoned >= 6
        assert asyncio.run(_settle(url)), "the queue did not drain"
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "cellseg_disconnects_total") > 0
        assert metric(text, "cellseg_skipped_inputs_total") > 0
        assert metric(text, "cellseg_batch_size_sum") < 12 * 25, "abandoned tiles never reached the network"
        assert httpx.post(f"{url}/segment", files={"file": ("a.png", IMAGE)}, timeout=60).status_code == 200


async def _settle(url: str) -> bool:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(100):
            if metric((await http.get("/metrics")).text, "cellseg_queue_depth") == 0:
                return True
            await asyncio.sleep(0.1)
    return False


def test_an_api_key_protects_everything_but_health(trained_model):
    with running_server(trained_model.parent, api_key="s3cret") as url, httpx.Client(base_url=url) as http:
        assert http.get("/health").status_code == 200
        for path in ("/ready", "/models", "/metrics"):
            assert http.get(path).status_code == 401
        refused = http.post("/segment", files={"file": ("a.png", IMAGE)})
        assert refused.status_code == 401
        assert refused.json()["detail"] == "missing or wrong API key: send it in the X-API-Key header"
        assert http.get("/ready", headers={"X-API-Key": "wrong"}).status_code == 401
        good = http.post("/segment", files={"file": ("a.png", IMAGE)}, headers={"X-API-Key": "s3cret"}, timeout=60)
        assert good.status_code == 200


def test_a_missing_model_or_a_bad_setting_stops_startup_with_one_line(tmp_path):
    def serve(**env: str) -> subprocess.CompletedProcess:
        env = {"CELLSEG_MODEL_STORE": str(tmp_path), "PATH": "/usr/bin:/bin", **env}
        return subprocess.run(
            [sys.executable, "-m", "app.serve", "--port", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    missing = serve()
    assert missing.returncode != 0
    expected = f"cannot load the model: no model in {tmp_path}: train one with `train` or set the version to load"
    assert missing.stderr.strip() == expected
    typo = serve(CELLSEG_MAX_QUEUE="lots", CELLSEG_TTA="3")
    assert typo.returncode != 0
    assert typo.stderr.strip() == (
        "bad settings: CELLSEG_TTA=3: Input should be 1, 2, 4 or 8; CELLSEG_MAX_QUEUE="
        "'lots': Input should be a valid integer, unable to parse string as an integer"
    )


def test_every_log_line_is_one_json_object_with_onnxruntime_exporting_at_startup(trained_model, tmp_path):
    log = tmp_path / "server.log"
    with start_server(log, model_store=str(trained_model.parent), backend="onnxruntime") as server:
        assert httpx.post(f"{server.url}/segment", files={"file": ("a.png", IMAGE)}, timeout=60).status_code == 200
    records = [json.loads(line) for line in log.read_text().splitlines()]  # fails on any other line
    assert any("exported the network to ONNX" in r["message"] for r in records)
    access = [r for r in records if r.get("path") == "/segment"]
    assert access and access[0]["status"] == 200 and access[0]["request_id"] != "-"

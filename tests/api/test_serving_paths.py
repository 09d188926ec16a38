"""The service's ways of using a bigger machine, against real servers: several workers (CELLSEG_WORKERS), and the
steps around the network in torch on its device (CELLSEG_STEPS_ON_DEVICE, the CUDA path, run here on the CPU)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.bench.localserver import LocalServer, process_tree, running_server
from tests.api.conftest import png
from tests.api.test_operations import metric

pytestmark = pytest.mark.slow

IMAGE = png(np.random.default_rng(2).integers(0, 256, (200, 240)).astype(np.uint8))
LARGE = png(np.random.default_rng(2).integers(0, 256, (1500, 1500)).astype(np.uint8))  # many network inputs


async def post_concurrently(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        return await asyncio.gather(*(http.post("/segment", files={"file": ("a.png", IMAGE)}) for _ in range(count)))


def test_two_workers_are_warm_answer_alike_count_together_and_a_killed_one_is_forgotten(trained_model, tmp_path):
    settings = {"model_store": str(trained_model.parent), "workers": "2", "compile": "false", "log_json": "false"}
    with running_server(tmp_path / "server.log", **settings) as server:
        workers = [pid for pid in process_tree(server.pid)[1:] if b"spawn_main" in cmdline(pid)]
        assert len(workers) == 2
        # A worker takes connections only once warm: no /ready meets a cold one beside a warm one.
        assert {httpx.get(f"{server.url}/ready").status_code for _ in range(20)} == {200}

        responses = asyncio.run(post_concurrently(server.url, 16))

        assert [r.status_code for r in responses] == [200] * 16
        assert len({json.dumps(r.json()["cells"]) for r in responses}) == 1
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "cellseg_batch_size_sum") == 16  # every worker's inputs, whichever answered
        assert 'cellseg_requests_total{method="POST",route="/segment",status="200"} 16.0' in text

        # Issue 26, point 12: a worker SIGKILLed mid-burst never marks itself dead, so its last queue depth stayed in
        # /metrics for good (52 here before); /metrics now drops the gauges of workers that are gone.
        kill_one_mid_burst(server.url, workers[0])
        assert idle_queue_depth(server) == 0
        server_process = server.pid
    # running_server's exit is a SIGTERM and a wait: the supervisor stops its workers before it ends.
    assert process_tree(server_process) == [] and not any(_alive(pid) for pid in workers)


def kill_one_mid_burst(url: str, worker: int) -> None:
    """SIGKILL `worker` while both workers are busy and inputs wait in their queues."""

    async def burst_then_kill() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            files = {"file": ("a.png", LARGE)}
            posts = [asyncio.ensure_future(http.post("/segment", files=files)) for _ in range(8)]
            await asyncio.sleep(3)
            os.kill(worker, signal.SIGKILL)
            await asyncio.gather(*posts, return_exceptions=True)  # the killed worker's connections fail

    asyncio.run(burst_then_kill())


def idle_queue_depth(server: LocalServer) -> float | None:
    """cellseg_queue_depth once the supervisor has replaced the killed worker and the work is done (60 s at most)."""
    deadline, depth = time.monotonic() + 60, None
    while time.monotonic() < deadline and depth != 0:
        time.sleep(0.5)
        replaced = len([pid for pid in process_tree(server.pid)[1:] if b"spawn_main" in cmdline(pid)]) == 2
        depth = metric(httpx.get(f"{server.url}/metrics").text, "cellseg_queue_depth") if replaced else None
    return depth


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:  # it has ended
        return b""


def _alive(pid: int) -> bool:
    return b"spawn_main" in cmdline(pid)


def test_the_service_with_its_steps_on_the_device_finds_the_cpu_paths_cells(trained_model, tmp_path):
    """Tiles as tensors through the micro-batcher (batches of up to 8 mixed from concurrent requests), maps and the
    instance step in torch: the same cells as the CPU path within the GPU path's tolerance, in every format."""
    settings = {"model_store": str(trained_model.parent), "compile": "false", "max_batch": "8"}
    answers = {}
    for steps in ("none", "all"):
        with running_server(tmp_path / f"server-{steps}.log", steps_on_device=steps, **settings) as server:
            responses = asyncio.run(post_concurrently(server.url, 6))
            assert [r.status_code for r in responses] == [200] * 6
            answers[steps] = responses[0].json()
            png = httpx.post(f"{server.url}/segment", params={"format": "png"}, files={"file": ("a.png", IMAGE)})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    cpu, device = answers["none"], answers["all"]
    assert cpu["cell_count"] > 0
    assert abs(device["cell_count"] - cpu["cell_count"]) <= max(1, 0.02 * cpu["cell_count"])
    assert sum(c["area"] for c in device["cells"]) == pytest.approx(sum(c["area"] for c in cpu["cells"]), rel=0.02)

"""The cases of docs/reliability.md against the real service with the bundled model and default settings.

Run from the project root with ../shared beside it: python scripts/reliability_check.py (about 2 minutes).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.bench.localserver import free_port, running_server

REAL = Path("../shared/data/sartorius/test/7ae19de7bc2a.png").read_bytes()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def peak_mib(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) // 1024


def batches(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("cellseg_batch_size_count")))


def start_up(url: str, started: float) -> tuple[float, float]:
    """Seconds until /health and until /ready first answer 200."""
    health = None
    while time.perf_counter() - started < 300:
        try:
            if health is None and httpx.get(f"{url}/health", timeout=1).status_code == 200:
                health = time.perf_counter() - started
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return round(health or 0.0, 1), round(time.perf_counter() - started, 1)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("not ready in 300 s")


def uploads(http: httpx.Client, pid: int) -> dict[str, object]:
    def timed(**request: object) -> tuple[int, int, int]:
        started = time.perf_counter()
        status = http.post("/segment", **request).status_code
        return status, round((time.perf_counter() - started) * 1000), peak_mib(pid)

    big, four = png(np.zeros((6000, 6000), np.uint8)), png(np.zeros((2400, 2400), np.uint8))
    mid = png(np.random.default_rng(0).integers(0, 255, (1040, 1408)).astype(np.uint8))
    rows: dict[str, object] = {"one real 520x704 image (status, ms, peak MiB)": timed(files={"file": ("a.png", REAL)})}
    rows[f"6000x6000 blank PNG, {len(big) // 1024} KB"] = timed(files={"file": ("b.png", big)})
    rows["four 2400x2400 blank PNGs in one request"] = timed(files=[("files", (f"{i}.png", four)) for i in range(4)])
    rows["sixteen 6000x6000 blank PNGs in one request"] = timed(files=[("files", (f"{i}.png", big)) for i in range(16)])
    thin = png(np.zeros((16, 500000), np.uint8))
    rows["16x500000 blank PNG in tile mode"] = timed(params={"mode": "tile"}, files={"file": ("t.png", thin)})
    before = batches(http)
    junk = [("files", ("junk.png", b"junk")), *[("files", (f"{i}.png", mid)) for i in range(4)]]
    status = timed(params={"mode": "tile"}, files=junk)
    time.sleep(3)
    rows["junk + 4 good 1040x1408 in tile mode; network batches after the answer"] = (*status, batches(http) - before)
    return rows


def abuse(http: httpx.Client, port: int) -> dict[str, object]:
    for i in range(200):
        http.request(f"M{i}", "/health")
    text = http.get("/metrics").text
    rows: dict[str, object] = {
        "200 made-up methods: series of cellseg_requests_total": sum(
            line.startswith("cellseg_requests_total{") for line in text.splitlines()
        )
    }
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
    started = time.perf_counter()
    status = http.get("/health").status_code
    rows["1,000 idle sockets: /health (status, ms)"] = (status, round((time.perf_counter() - started) * 1000))
    time.sleep(6.5)
    closed = 0
    for sock in idle:
        sock.settimeout(1)
        with contextlib.suppress(OSError):
            closed += sock.recv(1) == b""
        sock.close()
    rows["1,000 idle sockets: closed by the server within 6.5 s"] = closed
    return rows


def main() -> None:
    port = free_port()
    env = {**os.environ, "CELLSEG_LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    command = [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        rows: dict[str, object] = {"start-up: first /health 200, first /ready 200 (s)": start_up(url, started)}
        rows["peak memory after start-up (MiB)"] = peak_mib(process.pid)
        with httpx.Client(base_url=url, timeout=120) as http:
            rows |= uploads(http, process.pid)
            rows |= abuse(http, port)
    finally:
        process.terminate()
        process.wait(30)
    with running_server(api_key="k", log_level="WARNING", compile="false") as server:
        started = time.perf_counter()
        headers = {"content-type": "application/octet-stream"}
        answer = httpx.post(f"{server.url}/segment", content=b"x" * (7 << 20), headers=headers, timeout=60)
        rows["7 MB body without the API key (status, ms)"] = (
            answer.status_code,
            round((time.perf_counter() - started) * 1000),
        )
    for name, value in rows.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()

"""The cases of docs/reliability.md against the real service with the bundled model and default settings.

Run from the project root with ../shared beside it: python scripts/reliability_check.py (about 4 minutes);
`--round-three` runs only the attacks on issue 26's fixes (a fresh server, about 1 minute).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' hostile files, run from anywhere

from app.bench.localserver import LocalServer, free_port, running_server
from app.ml.outputs import coco
from app.ml.postprocess import Instances
from tests.ml import hostile_tiffs as hostile

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
    if sys.argv[1:] == ["--round-three"]:
        with running_server(log_level="WARNING") as server:
            rows = round_three(int(server.url.rsplit(":", 1)[1]), server.pid)
        for name, value in rows.items():
            print(f"{name}: {value}")
        return
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
            rows |= round_two(http, process.pid)
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


def round_two(http: httpx.Client, pid: int) -> dict[str, object]:
    """Issue 26's service findings after their fixes: COCO's cost, work left behind by a client that gives up, a TIFF
    of 430,000 pages beside /health, a channel name no header can hold, the security headers."""
    noise = png(np.random.default_rng(0).integers(0, 255, (2400, 2400)).astype(np.uint8))
    started = time.perf_counter()
    coco = http.post("/segment", params={"format": "coco", "mode": "tile"}, files={"file": ("n.png", noise)})
    rows: dict[str, object] = {
        "2400x2400 noise, format=coco, tile mode (status, cells, s)": (
            coco.status_code,
            coco.headers.get("x-cell-count"),
            round(time.perf_counter() - started, 1),
        )
    }
    with contextlib.suppress(httpx.TimeoutException):  # the client gives up after 2 s
        http.post("/segment", params={"format": "coco", "mode": "tile"}, files={"file": ("n.png", noise)}, timeout=2)
    server = LocalServer(str(http.base_url), pid)
    rows["CPU seconds the server spends in the 5 s after that client gave up at 2 s"] = cpu_seconds(server, 5.0)

    pages = hostile.write([hostile.small_page() for _ in range(430_000)])
    slowest, status = health_beside(http, lambda: http.post("/segment", files={"file": ("p.tif", pages)}))
    rows[f"a TIFF of 430,000 pages ({len(pages) / 1e6:.0f} MB): status, slowest /health meanwhile (ms)"] = (
        status,
        round(slowest * 1000),
    )
    named = hostile.named_channels("Phase–contrast", "Ca²⁺", "a\r\nX-Evil: 1")
    for index in range(3):
        answer = http.post("/segment", params={"channel": index, "format": "png"}, files={"file": ("c.tif", named)})
        rows[f"channel {index}: status, X-Channel"] = (answer.status_code, answer.headers.get("x-channel"))
    rows["COCO of 40,000 cells at 2400x2400, encoded in process (s)"] = coco_seconds()
    page = http.get("/")
    rows["/: security headers"] = {k: page.headers.get(k) for k in ("content-security-policy", "x-frame-options")}
    return rows


def coco_seconds() -> float:
    """The COCO encoder alone on a 2400x2400 label map of 40,000 cells (12x12 squares): the issue's count."""
    rows, cols = np.indices((2400, 2400)) // 12
    labels = (rows * 200 + cols + 1).astype(np.int32)
    instances = Instances(labels, np.ones(40_000), np.full(40_000, 144))
    started = time.perf_counter()
    coco(instances)
    return round(time.perf_counter() - started, 2)


def cpu_seconds(server: LocalServer, seconds: float) -> float:
    before = server.cpu_seconds()
    time.sleep(seconds)
    return round(server.cpu_seconds() - before, 2)


def health_beside(http: httpx.Client, request: Callable[[], httpx.Response]) -> tuple[float, int]:
    """The slowest /health answer while `request` runs, and its status."""
    slowest, done = [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            started = time.perf_counter()
            http.get("/health")
            slowest[0] = max(slowest[0], time.perf_counter() - started)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        status = request().status_code
    finally:
        done.set()
        poller.join()
    return slowest[0], status


def round_three(port: int, pid: int) -> dict[str, object]:
    """Issue 26's fixes attacked again: 3 clients each send a 4800x4800 noise PNG (resize mode, as PNG) and leave
    after 1.7, 1.9 or 2.1 s, in the middle of a step in a thread, until each has left 6 times; peak memory after.
    Before that, a 422 whose request's inputs are 40 MB of text where files belong."""
    image = png((np.random.default_rng(5).random((4800, 4800)) * 255).astype(np.uint8))
    field = b'name="file"; filename="n.png"'
    body = b"--b\r\nContent-Disposition: form-data; " + field + b"\r\n\r\n" + image + b"\r\n--b--\r\n"
    head = "POST /segment?mode=resize&format=png HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n"
    head += "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    request = head.format(len(body)).encode() + body
    answers: list[bytes] = []

    def leaver(patience: float) -> None:
        left = 0
        while left < 6:  # a 503 (the budget is full) is retried at once
            with socket.create_connection(("127.0.0.1", port), timeout=patience) as sock:
                try:
                    sock.sendall(request)
                    answers.append(sock.recv(12)[9:12])
                except TimeoutError:
                    answers.append(b"left")
                    left += 1
                except OSError:
                    answers.append(b"reset")

    rows: dict[str, object] = {"peak memory after start-up (MiB)": peak_mib(pid)}
    part = b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\n' + b"\x01" * 1_000_000 + b"\r\n"
    started, answer = (
        time.perf_counter(),
        httpx.post(
            f"http://127.0.0.1:{port}/segment",
            content=part * 40 + b"--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"},
            timeout=120,
        ),
    )
    rows["40 text parts of 1 MB of \\x01 as `files`: status, answer bytes, s, peak memory (MiB)"] = (
        answer.status_code,
        len(answer.content),
        round(time.perf_counter() - started, 2),
        peak_mib(pid),
    )
    clients = [threading.Thread(target=leaver, args=(patience,)) for patience in (1.7, 1.9, 2.1)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    time.sleep(3)
    rows["peak memory after 18 clients left mid-step (MiB)"] = peak_mib(pid)
    rows["their answers"] = {answer.decode(): answers.count(answer) for answer in set(answers)}
    return rows


if __name__ == "__main__":
    main()

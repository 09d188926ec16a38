"""No request can take the service down, starve the others, or outlive its answer: each case against a real
server, with small limits where the real ones would take minutes (docs/reliability.md has the table)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from app.api.metrics import Metrics
from app.api.middleware import RequestContextMiddleware
from app.bench.localserver import LocalServer, free_port
from app.bench.localserver import running_server as start_server
from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from tests.api.conftest import png, running_server
from tests.api.test_operations import metric
from tests.conftest import MODEL_STORE

SMALL = png(np.random.default_rng(3).integers(0, 256, (300, 400)).astype(np.uint8))  # 120,000 pixels
JUNK = b"this is not an image at all"


def test_a_request_over_its_pixel_budget_is_refused_before_decoding(trained_model):
    with running_server(trained_model.parent, max_request_pixels="200000") as url, httpx.Client(base_url=url) as http:
        files = [("files", ("a.png", SMALL)), ("files", ("b.png", SMALL))]
        refused = http.post("/segment", files=files, timeout=30)
        assert refused.status_code == 413
        assert "240,000 pixels in all" in refused.json()["detail"]
        assert "at most 200,000" in refused.json()["detail"]
        # A tall, thin blank image is a few KB, but tile mode would cut it into thousands of tiles.
        thin = png(np.zeros((16, 200_000), np.uint8))
        started = time.perf_counter()
        tiled = http.post("/segment", params={"mode": "tile"}, files={"file": ("thin.png", thin)}, timeout=30)
        assert tiled.status_code == 413 and time.perf_counter() - started < 5
        assert metric(http.get("/metrics").text, "cellseg_batch_size_count") == 0, "nothing reached the network"
        assert http.post("/segment", files={"file": ("a.png", SMALL)}, timeout=60).status_code == 200


def test_requests_beyond_the_pixels_in_flight_get_503_with_retry_after_and_the_rest_are_served(trained_model):
    settings = {"max_pixels_in_flight": "250000", "max_batch": "1"}  # room for two 120,000-pixel images at once
    with running_server(trained_model.parent, **settings) as url:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                return await asyncio.gather(
                    *(http.post("/segment", files={"file": ("a.png", SMALL)}) for _ in range(8))
                )

        answers = asyncio.run(burst())
        statuses = sorted(a.status_code for a in answers)
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses
        assert all(a.headers["retry-after"] for a in answers if a.status_code == 503)
        assert httpx.post(f"{url}/segment", files={"file": ("a.png", SMALL)}, timeout=60).status_code == 200


def test_a_failing_file_cancels_the_work_of_the_other_files_of_its_request(trained_model):
    large = png(np.random.default_rng(2).integers(0, 256, (600, 600)).astype(np.uint8))  # 25 tiles in tile mode
    with running_server(trained_model.parent, max_batch="1") as url, httpx.Client(base_url=url, timeout=60) as http:
        files = [("files", ("junk.png", JUNK))] + [("files", (f"{i}.png", large)) for i in range(6)]
        answer = http.post("/segment", params={"mode": "tile"}, files=files)
        assert answer.status_code == 415
        time.sleep(1.0)
        ran = metric(http.get("/metrics").text, "cellseg_batch_size_count")
        time.sleep(2.0)
        assert metric(http.get("/metrics").text, "cellseg_batch_size_count") == ran, "tiles kept running"
        assert ran < 6 * 25
        assert metric(http.get("/metrics").text, "cellseg_queue_depth") == 0


def test_idle_connections_are_closed_and_health_still_answers(trained_model):
    with running_server(trained_model.parent, keep_alive_seconds="1") as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]  # never send a byte
        try:
            started = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert time.perf_counter() - started < 1
            time.sleep(2.5)
            for sock in idle:
                sock.settimeout(2)
                assert sock.recv(10) == b"", "the server closed the idle connection"
        finally:
            for sock in idle:
                sock.close()


def test_metrics_labels_come_from_fixed_sets_whatever_the_client_sends(server):
    with httpx.Client(base_url=server) as http:
        for i in range(30):
            http.request(f"MADEUP{i}", "/health")
        text = http.get("/metrics").text
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines() if 'method="' in line}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods


def test_the_server_listens_at_once_and_says_what_it_does_until_it_is_warm(trained_model, tmp_path):
    port = free_port()
    env = {**os.environ, "CELLSEG_MODEL_STORE": str(trained_model.parent), "CELLSEG_COMPILE": "true"}
    command = [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, seen = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                health, ready = httpx.get(f"{url}/health", timeout=2), httpx.get(f"{url}/ready", timeout=2)
                seen.append((health.status_code, ready.status_code, ready.json()["status"]))
                if ready.status_code == 200:
                    break
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=30)
    warming = [s for s in seen if s[1] == 503]
    assert warming, "the server answered while it warmed up (compiling)"
    assert all(health == 200 for health, _, _ in seen)
    assert "warming up" in warming[0][2]
    assert seen[-1][1:] == (200, "ready")


def test_auth_comes_first_on_every_route_but_health_the_docs_included(trained_model):
    key = "clé-secrète"  # not ASCII: compared as the header's UTF-8 bytes
    with running_server(trained_model.parent, api_key=key) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        for path in ("/docs", "/openapi.json", "/ready", "/models", "/metrics"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"X-API-Key": key.encode()}).status_code == 200, path
        body = b"x" * (4 * 1024 * 1024)
        refused = http.post("/segment", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
        assert refused.status_code == 401
        assert refused.json()["detail"] == "missing or wrong API key: send it in the X-API-Key header"


def test_models_shows_no_paths_of_the_machine_that_trained_the_model(server, trained_model):
    answer = httpx.get(f"{server}/models/synth-v1")
    card = answer.json()
    data = card["training"]["data"]
    assert data["paths"] and all("/" not in p for p in data["paths"])
    assert not {"data", "out", "init"} & set(card["training"]["args"])
    for path in ("/models/synth-v1", "/models", "/models/nope", "/segment?model=nope"):
        method = httpx.post if path.startswith("/segment") else httpx.get
        assert str(trained_model.parent.parent) not in method(f"{server}{path}").text, path


def test_a_full_service_answers_503_before_reading_the_body(trained_model):
    with running_server(trained_model.parent, max_active_requests="1") as url:
        port = int(url.rsplit(":", 1)[1])
        head = (
            b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 10000000\r\n\r\n"
        )
        uploading = socket.create_connection(("127.0.0.1", port))
        uploading.sendall(head + b"--b\r\n")  # then stalls: this request stays in progress
        try:
            time.sleep(0.5)
            second = socket.create_connection(("127.0.0.1", port), timeout=5)
            second.sendall(head)  # declares 10 MB and sends none of it
            started = time.perf_counter()
            answer = b"".join(iter(lambda: second.recv(4096), b"")).decode()  # until the server closes
            assert answer.startswith("HTTP/1.1 503"), answer
            assert "retry-after: 1" in answer.lower() and "the service is busy (1 requests in progress" in answer
            assert time.perf_counter() - started < 1, "refused before the body"
            second.close()
        finally:
            uploading.close()
        time.sleep(0.5)
        assert httpx.post(f"{url}/segment", files={"file": ("a.png", SMALL)}, timeout=60).status_code == 200


def test_a_small_request_is_served_in_turn_beside_a_large_one_not_after_it(trained_model):
    large = png(np.random.default_rng(4).integers(0, 256, (2000, 2000)).astype(np.uint8))  # about 50 tiles
    with running_server(trained_model.parent, max_batch="1") as url:

        async def both() -> tuple[float, float]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:

                async def timed(delay: float, image: bytes) -> float:
                    await asyncio.sleep(delay)
                    answer = await http.post("/segment", params={"mode": "tile"}, files={"file": ("a.png", image)})
                    assert answer.status_code == 200, answer.text
                    return time.perf_counter()

                return tuple(await asyncio.gather(timed(0, large), timed(0.5, SMALL)))

        large_done, small_done = asyncio.run(both())
        assert small_done < large_done, "the small request waited for every tile of the large one"


def test_an_upload_still_coming_in_at_shutdown_gets_a_503_not_a_500(trained_model):
    with start_server(model_store=str(trained_model.parent), warmup="false") as server:
        port = int(server.url.rsplit(":", 1)[1])
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(
            b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        time.sleep(0.5)
        os.kill(server.pid, signal.SIGTERM)  # the upload stalls past the shutdown's grace period (10 s)
        upload.settimeout(30)
        answer = b"".join(iter(lambda: upload.recv(4096), b"")).decode()
        upload.close()
    assert answer.startswith("HTTP/1.1 503"), answer
    assert "application/json" in answer and "the service is shutting down" in answer


def scene_png(side: int, seed: int = 5) -> bytes:
    """A synthetic scene of many cells, as the test model was trained on: its answers are megabytes."""
    return png(to_uint8(generate_image(np.random.default_rng(seed), side, side, "shsy5y", density=2.0).image))


def multipart(image: bytes, query: str, accept: str = "application/json", copies: int = 0) -> bytes:
    """A raw POST /segment of `image` as `file`, or of `copies` of it as `files`."""
    field = f'name="{"files" if copies else "file"}"; filename="a.png"'.encode()
    part = b"--b\r\nContent-Disposition: form-data; " + field + b"\r\nContent-Type: image/png\r\n\r\n" + image + b"\r\n"
    body = part * max(copies, 1) + b"--b--\r\n"
    head = (
        f"POST /segment?{query} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_an_unread_progress_stream_holds_its_socket_not_the_services_slot(trained_model):
    """Issue 26, point 5: with one slot, a client that never reads its stream's large result must not make every
    other request a 503: the slot is freed when the work ends. (A file answer is one message, which uvicorn buffers
    whole, so it never held a slot; a stream's events are several, and their sends wait for the reader.)"""
    image = scene_png(2000)  # its JSON result: 1.8 MB a copy
    request = multipart(image, "mode=tile", accept="text/event-stream", copies=3)
    room = {"max_queue": "1024", "max_request_pixels": "64000000", "max_pixels_in_flight": "64000000"}
    with running_server(trained_model.parent, max_active_requests="1", **room) as url:
        unread = socket.socket()
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so the server's sends block
        unread.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        unread.sendall(request)
        try:
            statuses, deadline = [], time.monotonic() + 90
            while (not statuses or statuses[-1] != 200) and time.monotonic() < deadline:
                time.sleep(0.5)
                answer = httpx.post(f"{url}/segment", files={"file": ("a.png", SMALL)}, timeout=60)
                statuses.append(answer.status_code)
            assert statuses[-1] == 200, statuses[-8:]
            assert set(statuses) <= {200, 503}
            unread.settimeout(30)
            # More than the kernel's socket buffers hold (4 MiB here): the server's send of it was blocked.
            received = _read_some(unread, 5 << 20)
            assert len(received) >= 5 << 20, f"only {len(received):,} bytes: its send never blocked"
        finally:
            unread.close()


def _read_some(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size and (chunk := sock.recv(1 << 16)):
        data += chunk
    return bytes(data)


def test_work_past_its_deadline_stops_and_answers_504(trained_model):
    """Issue 26, point 6: a deadline covers the whole work, the encoding of the answer included; past it the work
    stops (no CPU spent on it afterwards), its pixels are freed, and the answer is a JSON 504."""
    image = scene_png(2000)
    with start_server(model_store=str(trained_model.parent), request_timeout_seconds="1", max_batch="1") as server:
        files = {"file": ("a.png", image)}
        answer = httpx.post(f"{server.url}/segment", params={"format": "coco", "mode": "tile"}, files=files, timeout=60)
        assert answer.status_code == 504, answer.text
        assert "CELLSEG_REQUEST_TIMEOUT_SECONDS" in answer.json()["detail"]
        assert cpu_seconds_over(server, 2.0) < 0.5, "the work went on after its answer"

        headers = {"Accept": "text/event-stream"}
        streamed = httpx.post(
            f"{server.url}/segment", params={"mode": "tile"}, files=files, headers=headers, timeout=60
        )
        error = json.loads(streamed.text.strip().split("\n\n")[-1].split("\n")[1].removeprefix("data: "))
        assert error["status"] == 504 and "limit of 1 s" in error["detail"]
        assert cpu_seconds_over(server, 2.0) < 0.5
        assert httpx.post(f"{server.url}/segment", files={"file": ("a.png", SMALL)}, timeout=60).status_code == 200


def cpu_seconds_over(server: LocalServer, seconds: float) -> float:
    """CPU seconds the server spends in the next `seconds`, after a short settling pause."""
    time.sleep(0.5)
    before = server.cpu_seconds()
    time.sleep(seconds)
    return server.cpu_seconds() - before


def test_every_answer_carries_the_security_headers_for_what_it_is(server):
    """Issue 26, point 11: the page runs only its own files, the docs their inline start-up, the rest nothing; no
    answer may be framed or sniffed. (tests/api/test_page.py runs the page and the docs under them in Chromium.)"""
    answers = {
        "/": httpx.get(f"{server}/"),
        "/static/page/page.js": httpx.get(f"{server}/static/page/page.js"),
        "/docs": httpx.get(f"{server}/docs"),
        "/health": httpx.get(f"{server}/health"),
        "/openapi.json": httpx.get(f"{server}/openapi.json"),
        "a 422": httpx.post(f"{server}/segment", files={"file": ("a.png", JUNK)}),
        "a 404": httpx.get(f"{server}/nowhere"),
    }
    for name, answer in answers.items():
        assert answer.headers["x-content-type-options"] == "nosniff", name
        assert answer.headers["x-frame-options"] == "DENY", name
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, name
        assert ("script-src 'self'" in policy) == (name in ("/", "/static/page/page.js", "/docs")), name
        assert ("'unsafe-inline'" in policy) == (name == "/docs"), name


def test_an_unexpected_error_is_a_json_500_naming_the_request_id(caplog):
    """Issue 26, point 8: whatever fails unforeseen (here an app that raises) answers JSON with the request id the
    log line carries, not uvicorn's plain-text 500."""

    async def failing_app(scope, receive, send) -> None:
        raise RuntimeError("something unforeseen")

    app = RequestContextMiddleware(failing_app, Metrics())

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/segment", headers={"X-Request-ID": "req-500"})

    with caplog.at_level("ERROR"):
        answer = asyncio.run(call())
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"detail": "internal error; the service's log has it under request id req-500"}
    assert answer.headers["x-request-id"] == "req-500"
    assert any("something unforeseen" in record.getMessage() for record in caplog.records)


def test_a_request_given_up_mid_step_answers_once_its_threads_have_stopped(trained_model):
    """Issue 26, attacked again: a step in a thread (decoding, the instance step at full size) cannot be stopped
    midway. The 504 used to be sent, and the request's pixels freed, while the step went on: a client leaving in
    that step (or a deadline there), again and again, got more memory in use than the budget admits. Now the answer
    waits for the step to end, so no stage ends after it."""
    image = png((np.random.default_rng(5).random((4000, 4000)) * 255).astype(np.uint8))  # resize mode: threads
    with running_server(trained_model.parent, request_timeout_seconds="0.8") as url, httpx.Client(base_url=url) as http:
        files, stream = {"file": ("a.png", image)}, {"Accept": "text/event-stream"}
        for headers in ({}, stream):
            answer = http.post("/segment", params={"mode": "resize"}, files=files, headers=headers, timeout=60)
            assert answer.status_code == 504 or "504" in answer.text, answer.text[-300:]
            ended = metric(http.get("/metrics").text, "cellseg_stage_seconds_count")
            time.sleep(2.0)
            assert metric(http.get("/metrics").text, "cellseg_stage_seconds_count") == ended, "a step outlived it"


def test_a_validation_error_echoes_a_bounded_sample_of_what_was_sent(tmp_path):
    """Issue 26's fixes attacked again: error details were capped, but not the 422s of request validation, which
    echo each bad input whole, as repr: 40 text parts of 1 MB of \\x01 in `files` (40 MB, under the upload limit)
    came back as a 200 MB 422, the server's peak memory up 688 MiB, with no admission cost."""
    part = b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\n' + b"\x01" * 1_000_000 + b"\r\n"
    body, headers = part * 10 + b"--b--\r\n", {"content-type": "multipart/form-data; boundary=b"}
    with start_server(tmp_path / "server.log", model_store=str(MODEL_STORE), compile="false") as server:
        before = server.memory_kib()["VmHWM"]
        answer = httpx.post(f"{server.url}/segment", content=body, headers=headers, timeout=60)
        assert answer.status_code == 422 and len(answer.content) < 2500, len(answer.content)
        assert answer.json()["detail"].startswith("body parameter 'files.0': Value error, Expected UploadFile")
        assert server.memory_kib()["VmHWM"] - before < 40 * 1024
        long_format = httpx.post(f"{server.url}/segment", params={"format": "x" * 60_000}, files={"file": SMALL})
        assert long_format.status_code == 422 and len(long_format.content) < 2500

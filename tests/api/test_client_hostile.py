"""The Python client (app.client) against a hostile server: a real HTTP server on 127.0.0.1 that writes raw bytes,
answering 503s that say retry at once (or in nan or -5 seconds), answering slowly, trickling, lying about sizes,
sending what is not the service's JSON, or hanging up. Each case holds for both clients: calls end within their
bounds (wall time), every failure is a ServiceError, and the size cases stop reading and allocating early."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socketserver
import threading
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from app.client import AsyncCellsegClient, CellsegClient, ServiceError

GRAY = bytes(64)  # any upload: the server never looks at it
MIB = 2**20
CAPPED = 300 * MIB  # the most a lying server sends, so a client that trusts it fills memory slowly, not forever


def cells_answer(width: int, height: int, rle: str) -> bytes:
    cell = {"id": 1, "rle": rle, "area": 1, "bbox": [0, 0, 1, 1], "score": 1.0}
    body = {"width": width, "height": height, "model_version": "v", "mode": "resize", "cell_type": None}
    return json.dumps({**body, "cell_count": 1, "cells": [cell]}).encode()


BAD_RLES = ["abc", "1 99999", "0 5", "1 5 3 2", "99999999999999999999999 1", "4611686018427387904 4611686018427387904"]
# Whole answers of 200, by scenario: (body, content type).
ANSWERS = {
    "notjson": (b"<html>a proxy's page</html>", "text/html"),
    "notobject": (b"[1, 2, 3]", "application/json"),
    "missing": (b'{"width": 10}', "application/json"),
    # 100 bytes that, trusted, paint a 10000x10000 label image.
    "hugedims": (cells_answer(10000, 10000, "1 100000000"), "application/json"),
    **{f"badrle{i}": (cells_answer(10, 10, text), "application/json") for i, text in enumerate(BAD_RLES)},
}


def gzip_bomb(size: int) -> bytes:
    """`size` zero bytes gzipped: about a thousandth of it on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    return b"".join(packer.compress(bytes(MIB)) for _ in range(size // MIB)) + packer.flush()


BOMB = gzip_bomb(256 * MIB)  # 255 KB


def head(status: str, *headers: str) -> bytes:
    return "\r\n".join((f"HTTP/1.1 {status}", "Connection: close", *headers, "", "")).encode()


class Hostile(socketserver.StreamRequestHandler):
    """One connection, one answer: the path's first segment names what the server does (the scenario). It sleeps
    at most a few seconds and sends at most CAPPED bytes, so a client that trusts it fails its test, not the
    machine; scenarios not named below (hangup) read the request and close without a word."""

    server: HostileServer

    def handle(self) -> None:
        request_line = self.rfile.readline().decode()
        headers = {}
        while (line := self.rfile.readline().decode().strip()) and ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        self.name, self.request_headers = request_line.split()[1].split("/")[1], headers
        self.server.requests[self.name] += 1
        if self.name != "slowread":  # the others read the upload whole before they answer
            self.rfile.read(int(headers.get("content-length", 0)))
        with contextlib.suppress(OSError):  # the client hung up: what it should do in most cases
            if self.name in ANSWERS:
                body, content_type = ANSWERS[self.name]
                self.send(head("200 OK", f"Content-Type: {content_type}", f"Content-Length: {len(body)}") + body)
            elif hasattr(self, f"do_{self.name.partition('_')[0]}"):
                getattr(self, f"do_{self.name.partition('_')[0]}")()

    def send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        self.server.sent[self.name] += len(data)

    def do_busy(self) -> None:  # busy_0, busy_nan, busy_-5: Retry-After says so
        self.send(head("503 Service Unavailable", f"Retry-After: {self.name.partition('_')[2]}", "Content-Length: 0"))

    def do_slowbusy(self) -> None:
        time.sleep(1.2)
        self.send(head("503 Service Unavailable", "Retry-After: 0", "Content-Length: 0"))

    def do_trickle(self) -> None:
        self.send(head("200 OK", "Content-Length: 100"))
        self.trickle(b" ")

    def do_tricklehead(self) -> None:
        self.send(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        self.trickle(b"x")

    def trickle(self, byte: bytes) -> None:
        for _ in range(10):
            self.send(byte)
            time.sleep(1)

    def do_hugelength(self) -> None:  # says 1.5 GB up front
        self.send(head("200 OK", "Content-Type: image/png", "Content-Length: 1500000000"))
        self.flood()

    def do_endless(self) -> None:  # says nothing of its length, and does not stop
        self.send(head("200 OK", "Content-Type: image/png"))
        self.flood()

    def flood(self) -> None:
        while self.server.sent[self.name] < CAPPED:
            self.send(bytes(MIB))

    def do_gzipbomb(self) -> None:  # compressed though the client asks for identity; 256 MiB once inflated
        self.server.encodings.append(self.request_headers.get("accept-encoding", ""))
        self.send(head("200 OK", "Content-Encoding: gzip", f"Content-Length: {len(BOMB)}") + BOMB)

    def do_redirect(self) -> None:  # to itself, for ever
        self.send(head("302 Found", f"Location: /{self.name}", "Content-Length: 0"))

    def do_hugeheader(self) -> None:  # a header of 1 MiB
        self.send(head("200 OK", "X-Big: " + "a" * MIB, "Content-Length: 2") + b"{}")

    def do_chunklie(self) -> None:  # a chunk of 2**60 bytes announced, 1 KB sent, then the end
        self.send(head("200 OK", "Transfer-Encoding: chunked") + b"fffffffffffffff\r\n" + b"{" * 1000)

    def do_cut(self) -> None:
        self.send(head("200 OK", "Content-Length: 1000") + b'{"width": ')

    def do_slowread(self) -> None:  # never reads the upload: the client's writes stall
        time.sleep(6)


class HostileServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Hostile)
        self.requests: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.encodings: list[str] = []  # the Accept-Encoding of each request for gzipbomb

    def url(self, scenario: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{scenario}"


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@dataclass
class Outcome:
    seconds: float
    value: Any = None
    error: BaseException | None = None
    peak_bytes: int = 0  # the most Python memory (numpy's included) held at once during the call


def sync_call(url: str, method: str, args: tuple, kwargs: dict[str, Any], client: dict[str, Any]) -> Any:
    with CellsegClient(url, **client) as cellseg:
        return getattr(cellseg, method)(*args, **kwargs)


async def async_call(url: str, method: str, args: tuple, kwargs: dict[str, Any], client: dict[str, Any]) -> Any:
    async with AsyncCellsegClient(url, **client) as cellseg:
        return await getattr(cellseg, method)(*args, **kwargs)


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest) -> Callable[..., Outcome]:
    """call(url, method, *args, client={options}, **kwargs) -> its Outcome, in a thread of its own so that a call
    that never ends (as before the fix) fails the test after 15 s instead of hanging it."""

    def run(url: str, method: str, *args: Any, client: dict[str, Any] | None = None, **kwargs: Any) -> Outcome:
        def target() -> None:
            start = time.monotonic()
            try:
                if request.param == "sync":
                    outcome.value = sync_call(url, method, args, kwargs, client or {})
                else:
                    outcome.value = asyncio.run(async_call(url, method, args, kwargs, client or {}))
            except BaseException as exc:  # any failure is the outcome under test
                outcome.error = exc
            outcome.seconds = time.monotonic() - start

        outcome = Outcome(seconds=float("inf"))
        tracemalloc.start()
        try:
            worker = threading.Thread(target=target, daemon=True)
            worker.start()
            worker.join(15)
            outcome.peak_bytes = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert not worker.is_alive(), f"{method} did not end within 15 s"
        return outcome

    return run


def raised(outcome: Outcome, status: int | None, match: str) -> ServiceError:
    assert isinstance(outcome.error, ServiceError), f"not a ServiceError: {outcome.error!r}"
    assert outcome.error.status == status, outcome.error
    assert match in str(outcome.error), outcome.error
    return outcome.error


@pytest.mark.parametrize("retry_after", ["0", "nan", "-5"])
def test_wait_until_ready_ends_within_its_timeout_whatever_retry_after_says(call, hostile, retry_after):
    scenario = f"busy_{retry_after}"
    outcome = call(hostile.url(scenario), "wait_until_ready", 2)
    raised(outcome, 503, "cellseg answered 503")
    assert 1 < outcome.seconds < 3, outcome.seconds
    assert hostile.requests.pop(scenario) <= 2 / 0.25 + 1, "a wait has a floor: no busy loop"


def test_wait_until_ready_bounds_the_requests_too_when_each_503_is_slow(call, hostile):
    outcome = call(hostile.url("slowbusy"), "wait_until_ready", 2)
    # The last try is cut at the timeout (None), or, on a loaded machine, none fits after the first 503.
    assert isinstance(outcome.error, ServiceError) and outcome.error.status in (None, 503), outcome.error
    assert 1.1 < outcome.seconds < 3, outcome.seconds


def test_retries_and_max_wait_hold_in_wall_time(call, hostile):
    hostile.requests.clear()
    counted = call(hostile.url("busy_0"), "segment", GRAY, client={"retries": 3})
    raised(counted, 503, "")
    assert hostile.requests.pop("busy_0") == 4 and counted.seconds < 2, counted.seconds
    # Slow 503s: no new try after max_wait, and each try is bounded by the timeout: max_wait + timeout at most.
    slow = call(hostile.url("slowbusy"), "models", client={"retries": 100, "max_wait": 2, "timeout": 10})
    raised(slow, 503, "")
    assert slow.seconds < 2 + 1.2 + 2, slow.seconds


@pytest.mark.parametrize(("scenario", "status"), [("trickle", 200), ("tricklehead", None)])
def test_the_timeout_bounds_a_whole_answer_trickled_a_byte_a_second(call, hostile, scenario, status):
    outcome = call(hostile.url(scenario), "segment", GRAY, client={"timeout": 2})
    raised(outcome, status, "no whole answer from cellseg within 2 s")
    assert 1.5 < outcome.seconds < 3.5, outcome.seconds


def test_the_timeout_bounds_an_upload_the_server_never_reads(call, hostile):
    outcome = call(hostile.url("slowread"), "segment", bytes(64 * MIB), client={"timeout": 2})
    raised(outcome, None, "no whole answer from cellseg within 2 s")
    assert outcome.seconds < 3.5, outcome.seconds


@pytest.mark.parametrize(
    ("scenario", "method", "status", "message"),
    [
        ("notjson", "segment", 200, "the answer is not JSON"),
        ("notobject", "health", 200, "the answer is JSON but not an object"),
        ("missing", "segment", 200, "the answer is not a segmentation: its 'cells' is missing or not a list"),
        ("cut", "segment", 200, "the exchange with cellseg failed: RemoteProtocolError"),
        ("hangup", "segment", None, "the exchange with cellseg failed: RemoteProtocolError"),
    ],
)
def test_answers_that_are_not_the_services_raise_service_error(call, hostile, scenario, method, status, message):
    hostile.requests.clear()
    args = (GRAY,) if method == "segment" else ()
    outcome = call(hostile.url(scenario), method, *args)
    raised(outcome, status, message)
    assert hostile.requests[scenario] == 1, "a request that may have reached the service is never sent again"


@pytest.mark.parametrize("which", range(len(BAD_RLES)))
def test_cells_that_cannot_be_painted_raise_service_error(call, hostile, which):
    raised(call(hostile.url(f"badrle{which}"), "labels", GRAY), 200, "cell 0 of the answer cannot be painted")


def test_a_tiny_answer_claiming_10000x10000_is_refused_before_allocating(call, hostile):
    outcome = call(hostile.url("hugedims"), "labels", GRAY)
    raised(outcome, 200, "10000x10000 pixels: more than max_answer_pixels (67108864)")
    assert outcome.peak_bytes < 20 * MIB, outcome.peak_bytes


@pytest.mark.parametrize("scenario", ["hugelength", "endless"])
def test_an_answer_past_max_answer_bytes_stops_being_read(call, hostile, scenario):
    hostile.sent.clear()
    outcome = call(hostile.url(scenario), "segment", GRAY, format="png", client={"max_answer_bytes": 4 * MIB})
    raised(outcome, 200, "max_answer_bytes (4194304")
    assert outcome.peak_bytes < 30 * MIB, outcome.peak_bytes
    time.sleep(0.2)  # the server notices the hang-up
    assert hostile.sent[scenario] < 40 * MIB, "the client stopped reading (what it sent is in socket buffers)"


def test_a_compressed_answer_is_refused_before_it_is_inflated(call, hostile):
    """Issue 26's fixes attacked again: 255 KB of gzip that inflate to 256 MiB. httpx inflates each piece read
    whole (64 KiB of it: 64 MiB), so the cap on the answer's size came after the memory was taken: 397 MiB held
    for a cap of 256. The client asks for no compression (the service never compresses) and refuses it."""
    outcome = call(hostile.url("gzipbomb"), "segment", GRAY, format="png", client={"max_answer_bytes": 4 * MIB})
    raised(outcome, 200, "the answer is compressed (gzip)")
    assert outcome.peak_bytes < 20 * MIB, outcome.peak_bytes
    assert hostile.encodings.pop() == "identity"


@pytest.mark.parametrize(
    ("scenario", "status", "message"),
    [
        ("busy_1e308", 503, "cellseg answered 503"),
        ("redirect", 302, "cellseg answered 302"),
        ("hugeheader", None, "RemoteProtocolError"),
        ("chunklie", 200, "RemoteProtocolError"),
    ],
)
def test_a_redirect_loop_an_endless_retry_after_a_huge_header_or_a_lying_chunk_end_at_once(
    call, hostile, scenario, status, message
):
    """Issue 26's fixes attacked again, and they hold: one request each, a ServiceError, no wait, little memory."""
    hostile.requests.clear()
    outcome = call(hostile.url(scenario), "segment", GRAY)
    raised(outcome, status, message)
    assert outcome.seconds < 1 and outcome.peak_bytes < 8 * MIB, outcome
    assert hostile.requests[scenario] == 1


def measure() -> None:
    """The figures of docs/reliability.md's client rows: `python -m tests.api.test_client_hostile`."""
    server = HostileServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cases = [
        *[(f"wait_until_ready(2), Retry-After {after}", f"busy_{after}", "wait_until_ready", (2,), {}, {})
          for after in ("0", "nan", "-5")],
        ("wait_until_ready(2), 503s taking 1.2 s", "slowbusy", "wait_until_ready", (2,), {}, {}),
        ("models(), max_wait=2, 503s taking 1.2 s", "slowbusy", "models", (), {}, {"max_wait": 2, "retries": 100}),
        ("segment, timeout=3, body a byte a second", "trickle", "segment", (GRAY,), {}, {"timeout": 3}),
        ("segment, timeout=3, headers a byte a second", "tricklehead", "segment", (GRAY,), {}, {"timeout": 3}),
        ("segment, timeout=3, 64 MB upload never read", "slowread", "segment", (bytes(64 * MIB),), {}, {"timeout": 3}),
        ("labels, 10000x10000 claimed in a small body", "hugedims", "labels", (GRAY,), {}, {}),
        ("segment png, Content-Length 1.5 GB", "hugelength", "segment", (GRAY,), {"format": "png"}, {}),
        ("segment png, endless body", "endless", "segment", (GRAY,), {"format": "png"}, {}),
        ("segment png, 255 KB of gzip inflating to 256 MiB", "gzipbomb", "segment", (GRAY,), {"format": "png"}, {}),
    ]  # fmt: skip
    for label, scenario, method, args, kwargs, client in cases:
        server.requests.clear()
        server.sent.clear()
        tracemalloc.start()
        start = time.monotonic()
        try:
            sync_call(server.url(scenario), method, args, kwargs, client)
        except ServiceError as exc:
            error = exc
        seconds, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        time.sleep(0.3)  # the server notices the hang-up
        print(
            f"{label}: {seconds:.2f} s, {server.requests[scenario]} request(s), server sent "
            f"{server.sent[scenario] / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB: {error}"
        )


if __name__ == "__main__":
    measure()

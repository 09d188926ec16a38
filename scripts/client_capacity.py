"""How many requests a second bench's load can offer, against a server that answers at once: the check behind
app/bench/loadgen.py's client processes (docs/performance.md). The server is a trivial Starlette app (`app` below) in
its own uvicorn process on 127.0.0.1 that reads the upload and answers a canned JSON body the size of the real
service's answer for the same image; the load is the real 520x704 PNG, posted as bench posts it, by one client process
and then from one process per app.bench.loadgen.PER_PROCESS requests in flight. The CPU figure is the clients' alone.

    python scripts/client_capacity.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.bench.cli import DEFAULT_IMAGE
from app.bench.loadgen import post_from_processes, post_many
from app.bench.localserver import free_port

# About the size of the service's JSON answer for DEFAULT_IMAGE (180 cells).
ANSWER = json.dumps({"cells": [{"rle": "1 2 " * 60, "id": i} for i in range(180)], "timings": {}}).encode()


async def segment(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json")


app = Starlette(routes=[Route("/segment", segment, methods=["POST"])])


def clients_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have finished: the load clients (the server runs on)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    port = free_port()
    app_dir = str(Path(__file__).parent)
    command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "client_capacity:app", "--port", str(port)]
    command += ["--log-level", "warning"]
    server = subprocess.Popen(command)
    url, image = f"http://127.0.0.1:{port}", DEFAULT_IMAGE.read_bytes()
    try:
        wait_until_answering(url)
        loads = {
            "one process": lambda c: asyncio.run(post_many(url, image, 600, c, {})),
            "processes": lambda c: post_from_processes(url, image, 600, c, {}),
        }
        for name, load in loads.items():
            for concurrency in (1, 16, 64):
                before = clients_cpu_seconds()
                records, wall = load(concurrency)
                cpu_ms = (clients_cpu_seconds() - before) / len(records) * 1000
                print(
                    f"{name:<12} concurrency {concurrency:>2}: {len(records) / wall:6.0f} requests/s, "
                    f"clients' CPU {cpu_ms:.2f} ms per request"
                )
    finally:
        server.terminate()
        server.wait()


def wait_until_answering(url: str) -> None:
    for _ in range(100):
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url)
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answers at {url}")


if __name__ == "__main__":
    main()

"""The load `bench` offers the service: POST /segment `count` times with at most `concurrency` in flight.

One httpx.AsyncClient spends more of its own CPU on each request the more it has in flight (a known limit of its
connection pool: encode/httpx#3215), so one process cannot offer a GPU service the load it takes; docs/performance.md
has the figures. Above PER_PROCESS requests in flight the load comes from several client processes, each with its
own event loop and client, which all start sending together.

Child process (what post_from_processes starts):
    python -m app.bench.loadgen URL IMAGE_FILE COUNT CONCURRENCY PARAMS_JSON
It prints "ready" once imported, waits for a line on stdin, then prints its records as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# Requests in flight per client process: where one client's cost per request is still about its cost alone.
PER_PROCESS = 8


async def post_many(url: str, image: bytes, count: int, concurrency: int, params: dict) -> tuple[list[dict], float]:
    """`count` POST /segment with at most `concurrency` in flight -> per-request records and wall seconds. A record
    holds the status, the seconds to the answer, the client's process id and, for a json answer, the server's
    stage timings."""
    limit = asyncio.Semaphore(concurrency)
    records: list[dict] = []

    async def one(http: httpx.AsyncClient) -> None:
        async with limit:
            started = time.perf_counter()
            response = await http.post("/segment", params=params, files={"file": ("bench.png", image)})
            record = {"status": response.status_code, "seconds": time.perf_counter() - started, "client": os.getpid()}
            if response.status_code == 200 and params.get("format", "json") == "json":
                record["timings"] = response.json()["timings"]
            records.append(record)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http) for _ in range(count)))
        return records, time.perf_counter() - started


def post_from_processes(url: str, image: bytes, count: int, concurrency: int, params: dict) -> tuple[list[dict], float]:
    """post_many, from one client process per PER_PROCESS requests in flight (from this one up to PER_PROCESS).
    The wall seconds run from when every client is ready to when the last one has all its answers."""
    processes = -(-concurrency // PER_PROCESS)
    if processes == 1:
        return asyncio.run(post_many(url, image, count, concurrency, params))
    with tempfile.TemporaryDirectory(prefix="cellseg-load-") as folder:
        image_file = Path(folder) / "image"
        image_file.write_bytes(image)
        shares = zip(_split(count, processes), _split(concurrency, processes), strict=True)
        children = [_start_client(url, image_file, share, in_flight, params) for share, in_flight in shares]
        try:
            for child in children:
                if child.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a load client exited with code {child.wait()} before it was ready")
            started = time.perf_counter()
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            records = [record for child in children for record in _records_of(child)]
            return records, time.perf_counter() - started
        finally:
            for child in children:
                child.kill()  # a no-op for a client that is done
                child.communicate()  # closes its pipes


def _start_client(url: str, image_file: Path, count: int, concurrency: int, params: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "app.bench.loadgen", url, str(image_file), str(count), str(concurrency)]
    return subprocess.Popen([*command, json.dumps(params)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares that differ by at most one."""
    return [total // parts + (index < total % parts) for index in range(parts)]


def _records_of(child: subprocess.Popen) -> list[dict]:
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"a load client exited with code {child.wait()} without its records")
    return json.loads(line)


def main(argv: list[str] | None = None) -> None:
    url, image_file, count, concurrency, params = argv or sys.argv[1:]
    image = Path(image_file).read_bytes()
    print("ready", flush=True)
    sys.stdin.readline()
    records, _ = asyncio.run(post_many(url, image, int(count), int(concurrency), json.loads(params)))
    print(json.dumps(records), flush=True)


if __name__ == "__main__":
    main()

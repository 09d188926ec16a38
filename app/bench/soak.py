"""`bench --soak MINUTES`: the service under mixed good and bad requests for that long, counting answers by
status, sampling its memory and timing /health beside the load."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from app.bench.localserver import running_server
from app.bench.service import percentile
from app.cli import inference_options, model_folder


def soak_requests(image: bytes) -> list[tuple[str, dict, bytes]]:
    """The soak's mix, in turn: (name, query, file). Half are good images; the rest each earn a 4xx."""
    header_only = image[:33] + b"\x00" * 16  # a PNG cut after its header: truncated
    return [
        ("json", {}, image),
        ("png", {"format": "png"}, image),
        ("tile", {"mode": "tile"}, image),
        ("overlay", {"format": "overlay"}, image),
        ("junk", {}, b"this is not an image"),
        ("truncated", {}, header_only),
        ("bad option", {"seed_threshold": "7"}, image),
        ("empty", {}, b""),
    ]


async def soak(url: str, image: bytes, seconds: float, concurrency: int, memory: Callable[[], int]) -> dict:
    """Mixed requests from `concurrency` clients for `seconds`; /health timed every half second; memory sampled
    every 10 s. Returns the counts by status, the memory samples (MiB) and /health's latency."""
    mix, statuses, health, samples = soak_requests(image), {}, [], []
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, index: int) -> None:
        while time.monotonic() < deadline:
            name, params, data = mix[index % len(mix)]
            index += concurrency
            try:
                answer = await http.post("/segment", params=params, files={"file": (f"{name}.png", data)})
                key = str(answer.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1

    async def watch(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await http.get("/health")
            health.append(time.perf_counter() - started)
            if len(health) % 20 == 1:
                samples.append(memory() / 1024)
                print(
                    f"soak: {len(health) // 2} s, {sum(statuses.values())} answers {statuses}, {samples[-1]:.0f} MiB",
                    flush=True,
                )
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http,
        httpx.AsyncClient(base_url=url, timeout=10) as probe,
    ):
        await asyncio.gather(watch(probe), *(client(http, i) for i in range(concurrency)))
    settled = samples[len(samples) // 4 :] or samples  # after the first quarter: caches and arenas warmed up
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        "answers": statuses,
        "server_errors": sum(n for key, n in statuses.items() if not key.isdigit() or key.startswith("5")),
        "memory_mib": samples,
        "memory_growth_after_warm_up": settled[-1] / settled[0] - 1,
        "health_p50_ms": percentile(health, 50) * 1000,
        "health_p99_ms": percentile(health, 99) * 1000,
    }


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    folder = model_folder(args)
    settings = {
        "model_store": str(folder.parent),
        "model_version": folder.name,
        "log_level": "WARNING",
        **inference_options(args).as_settings(),
    }
    with running_server(**settings) as server:
        resident = lambda: server.memory_kib()["VmRSS"]  # noqa: E731 - read at each sample
        figures = asyncio.run(
            soak(server.url, Path(args.image).read_bytes(), args.soak * 60, args.soak_concurrency, resident)
        )
    return {"model": folder.name, **figures}

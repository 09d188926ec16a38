"""The service end to end through a real uvicorn on 127.0.0.1: latency per format and mode with where the time goes,
throughput at several concurrencies (with the GPU's busy share on CUDA), and the server's memory."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import subprocess
import threading

import numpy as np

from app.bench.loadgen import post_from_processes, post_many
from app.bench.localserver import LocalServer


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def latency_figures(server: LocalServer, image: bytes, requests: int) -> dict:
    """p50/p95/p99 at concurrency 1 per format and mode, and the server's stage split (json only)."""
    figures = {}
    for mode in ("resize", "tile"):
        for fmt in ("json", "png", "overlay"):
            count = requests if mode == "resize" else max(3, requests // 3)
            records, _ = asyncio.run(post_many(server.url, image, count, 1, {"format": fmt, "mode": mode}))
            seconds = [r["seconds"] for r in records if r["status"] == 200]
            entry = {
                "requests": count,
                "errors": count - len(seconds),
                "p50_ms": percentile(seconds, 50) * 1000,
                "p95_ms": percentile(seconds, 95) * 1000,
                "p99_ms": percentile(seconds, 99) * 1000,
            }
            if fmt == "json":
                entry["stages_ms"] = stage_split(records)
            figures[f"{fmt}/{mode}"] = entry
    return figures


def stage_split(records: list[dict]) -> dict[str, float]:
    """Median server time per stage, and what is left of the round trip: HTTP, parsing, threads."""
    timed = [r for r in records if "timings" in r]
    split = {k.removesuffix("_ms"): statistics.median(r["timings"][k] for r in timed) for k in timed[0]["timings"]}
    split["http_and_rest"] = statistics.median(r["seconds"] * 1000 - sum(r["timings"].values()) for r in timed)
    return split


def throughput_figures(
    server: LocalServer, image: bytes, concurrencies: list[int], per_level: int, gpu: int | None = None
) -> dict:
    """Images per second and p50 at each concurrency; with `gpu` (a CUDA index), also the GPU's busy share meanwhile."""
    figures = {}
    for concurrency in concurrencies:
        count = max(per_level, concurrency)
        with GpuBusy(gpu) as busy:
            records, wall = post_from_processes(server.url, image, count, concurrency, {})
        ok = sum(r["status"] == 200 for r in records)
        figures[concurrency] = {
            "requests": count,
            "errors": count - ok,
            "images_per_s": ok / wall,
            "p50_ms": percentile([r["seconds"] for r in records], 50) * 1000,
        }
        if busy.share is not None:
            figures[concurrency]["gpu_busy_share"] = busy.share
        print(f"  concurrency {concurrency}: {figures[concurrency]['images_per_s']:.2f} images/s", flush=True)
    return figures


class GpuBusy:
    """While inside, samples a CUDA GPU's utilization (the share of time a kernel ran) ten times a second with
    nvidia-smi; `share` is their mean afterwards, or None without a GPU index or without nvidia-smi."""

    def __init__(self, index: int | None) -> None:
        self.index, self.share = index, None
        self._samples: list[float] = []
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        if self.index is not None and shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            self._process = subprocess.Popen(
                [*query, "-i", str(self.index), "-lms", "100"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self._samples.append(float(line) / 100)

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._reader.join(timeout=2)
            self.share = statistics.fmean(self._samples) if self._samples else None


def memory_figures(server: LocalServer, image: bytes, total: int, gpu: int | None = None) -> dict:
    """Server resident memory after 50 requests and after `total`, at concurrency 4; with `gpu` (a CUDA index),
    the GPU's memory in use as well."""
    asyncio.run(post_many(server.url, image, 50, 4, {}))
    after_50, gpu_after_50 = server.memory_kib(), gpu_memory_mib(gpu)
    asyncio.run(post_many(server.url, image, total - 50, 4, {}))
    after_total, gpu_after_total = server.memory_kib(), gpu_memory_mib(gpu)
    figures = {
        "rss_mib_after_50": after_50["VmRSS"] / 1024,
        f"rss_mib_after_{total}": after_total["VmRSS"] / 1024,
        "peak_rss_mib": after_total["VmHWM"] / 1024,
        "growth": after_total["VmRSS"] / after_50["VmRSS"] - 1,
    }
    if gpu_after_50 and gpu_after_total:
        figures |= {
            "gpu_mib_after_50": gpu_after_50,
            f"gpu_mib_after_{total}": gpu_after_total,
            "gpu_growth": gpu_after_total / gpu_after_50 - 1,
        }
    return figures


def gpu_memory_mib(index: int | None) -> float | None:
    """Memory in use on a CUDA GPU, every process's together, as nvidia-smi reports it; None without a GPU index
    or without nvidia-smi."""
    if index is None or not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)]
    output = subprocess.run(query, capture_output=True, text=True, check=False).stdout
    with contextlib.suppress(ValueError):
        return float(output.strip())
    return None

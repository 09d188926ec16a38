"""Timing helpers: the median of repeated calls, and a result once its device has computed it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def best_of(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synchronized(device: torch.device, result: object) -> object:
    """`result` once `device` has finished computing it (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result

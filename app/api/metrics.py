"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process).

With several server workers, `serve` points PROMETHEUS_MULTIPROC_DIR at a folder before starting them: each worker
then writes its values there, and /metrics, whichever worker answers it, adds up every worker's.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cellseg_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cellseg_request_latency_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "cellseg_stage_seconds",
            "time per pipeline stage and image",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cellseg_batch_size",
            "network inputs per micro-batch, by model version",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "cellseg_inference_seconds",
            "network time per micro-batch, by model version",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.skipped = Counter(
            "cellseg_skipped_inputs", "network inputs dropped because their client went away", registry=self.registry
        )
        self.disconnects = Counter(
            "cellseg_disconnects", "requests abandoned by their client before the answer", registry=self.registry
        )
        self.queue_depth = Gauge(
            "cellseg_queue_depth", "network inputs waiting", multiprocess_mode="livesum", registry=self.registry
        )
        self.cells = Histogram(
            "cellseg_cells_per_image",
            "cells found per image",
            buckets=(0, 10, 50, 100, 200, 400, 800, 1600),
            registry=self.registry,
        )

    def observe_batch(self, model: str, size: int, seconds: float, depth: int) -> None:
        """A micro-batch of `size` inputs ran through model version `model` in `seconds`; `depth` inputs wait now
        (for every model)."""
        self.batch_size.labels(model).observe(size)
        self.inference.labels(model).observe(seconds)
        self.queue_depth.set(depth)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format: this app's, or every worker's together (see the module's doc)."""
        if MULTIPROCESS_FOLDER not in os.environ:
            return generate_latest(self.registry)
        forget_dead_workers(Path(os.environ[MULTIPROCESS_FOLDER]))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    @staticmethod
    def worker_stopped() -> None:
        """A worker's live gauges stop counting once it ends (multiprocess mode)."""
        if MULTIPROCESS_FOLDER in os.environ:
            multiprocess.mark_process_dead(os.getpid())

    def observe_skipped(self, count: int) -> None:
        self.skipped.inc(count)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage).observe(seconds)


def forget_dead_workers(folder: Path) -> None:
    """Drop the live gauges of workers that are gone without a word (SIGKILL, the OOM killer): their files would
    keep adding their last values (a queue depth of 1 on an idle service) until the service restarts. The supervisor
    reaps a dead worker when it replaces it, so its pid no longer exists."""
    for path in folder.glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if not _exists(pid):
            multiprocess.mark_process_dead(pid, str(folder))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True

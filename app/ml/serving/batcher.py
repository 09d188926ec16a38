"""Gather network inputs from concurrent requests into micro-batches, off the event loop.

Requests submit tiles; one worker task takes the first waiting tile, waits at most `max_wait` for more of the
same shape (up to `max_batch`), and runs the network on the stack in a single inference thread. The queue is
bounded in tiles: a request that would overflow it is refused at once (QueueFullError), so memory does not grow
under overload. Tiles whose request went away (cancelled) are dropped before they reach the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.ml.errors import CellSegError


class QueueFullError(CellSegError):
    """Too much work is waiting; the client should retry later."""


@dataclass
class _Pending:
    tile: np.ndarray
    future: asyncio.Future = field(repr=False)


BatchObserver = Callable[[int, float], None]


class MicroBatcher:
    """`await submit(tiles)` -> network outputs, computed in micro-batches shared with other requests."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 8,
        max_wait: float = 0.005,
        max_queue: int = 64,
        observe_batch: BatchObserver | None = None,
        observe_skipped: Callable[[int], None] | None = None,
    ) -> None:
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.observe_batch = observe_batch or (lambda size, seconds: None)
        self.observe_skipped = observe_skipped or (lambda count: None)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None  # a tile of another shape, first in the next batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Tiles waiting for the network."""
        return self._queue.qsize() + (self._carry is not None)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve_forever(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, tiles: np.ndarray) -> list[np.ndarray]:
        """(N, ...) inputs -> N outputs, one per tile. Raises QueueFullError when N more tiles would not fit.

        An idle queue admits any request, so one large image is served, not refused for ever. The outputs are
        views into their batch's result, not stacked here: a copy on the event loop (most of it page faults)
        holds up every request.
        """
        if self.depth and self.depth + len(tiles) > self.max_queue:
            raise QueueFullError(
                f"the service is busy ({self.depth} tiles queued, limit {self.max_queue}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(tile, loop.create_future()) for tile in tiles]
        for item in pending:
            self._queue.put_nowait(item)
        try:
            return await asyncio.gather(*(p.future for p in pending))
        except asyncio.CancelledError:
            for item in pending:
                item.future.cancel()  # the worker skips cancelled tiles
            raise

    async def _serve_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run_batch(batch)

    async def _next_batch(self) -> list[_Pending]:
        first = self._carry or await self._queue.get()
        self._carry = None
        if first.future.cancelled():
            self.observe_skipped(1)
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0 and self._queue.empty():
                break
            try:
                item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                break
            if item.future.cancelled():
                self.observe_skipped(1)
                continue
            if batch and item.tile.shape != batch[0].tile.shape:
                self._carry = item
                break
            batch.append(item)
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_stacked, [p.tile for p in batch])
        except Exception as exc:  # the requests waiting on this batch get the error; the worker carries on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.observe_batch(len(batch), time.perf_counter() - started)
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)

    def _run_stacked(self, tiles: list[np.ndarray]) -> np.ndarray:
        """Runs in the inference thread, so stacking the inputs does not hold up the event loop either."""
        return self.run(stack(tiles))


def stack(arrays: list[np.ndarray]) -> np.ndarray:
    """np.stack, except that a single array becomes a view with a batch axis instead of a copy (the usual case on
    the CPU, where micro-batches hold one tile)."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)

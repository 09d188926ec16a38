"""Gather network inputs from concurrent requests into micro-batches, off the event loop.

Requests submit tiles; one worker task takes the next waiting tile, waits at most `max_wait` for more of the
same shape (up to `max_batch`), and runs the network on the stack in a single inference thread. Tiles are taken
round robin over the submissions waiting, one at a time, so a request of a few tiles behind one of hundreds waits
for a few batches, not for all of them. The queue is bounded by the wait a new request would see: its tiles and, of
each submission waiting, as many tiles as it brings (those run in turn with its own). One over the bound is refused at
once (QueueFullError); an idle queue admits any request, so one large image is served, not refused for ever. A
submission whose request went away (cancelled) leaves the queue at once, freeing its places.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.ml.errors import CellSegError
from app.ml.serving.tiler import Array


class QueueFullError(CellSegError):
    """Too much work is waiting; the client should retry later."""


@dataclass
class _Pending:
    tile: Array
    future: asyncio.Future = field(repr=False)


BatchObserver = Callable[[int, float], None]


class MicroBatcher:
    """`await submit(tiles)` -> network outputs, computed in micro-batches shared with other requests. `run` takes a
    batch that `stack` made of tiles (the predictor's steps' stack: numpy arrays, or tensors on the network's
    device)."""

    def __init__(
        self,
        run: Callable[[Array], Array],
        stack: Callable[[list[Array]], Array],
        max_batch: int = 8,
        max_wait: float = 0.005,
        max_queue: int = 64,
        observe_batch: BatchObserver | None = None,
        observe_skipped: Callable[[int], None] | None = None,
    ) -> None:
        self.run, self.stack = run, stack
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.observe_batch = observe_batch or (lambda size, seconds: None)
        self.observe_skipped = observe_skipped or (lambda count: None)
        self._submissions: deque[deque[_Pending]] = deque()  # each request's tiles not yet taken, in turn
        self._waiting = 0  # tiles in _submissions
        self._arrived = asyncio.Event()  # set when a submission comes in
        self._carry: _Pending | None = None  # a tile of another shape, first in the next batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Tiles waiting for the network."""
        return self._waiting + (self._carry is not None)

    def tiles_ahead(self, tiles: int) -> int:
        """Network inputs that run before the last of `tiles` new ones, taken in turn: each waiting submission's,
        up to `tiles` of them, and the new ones."""
        return sum(min(len(s), tiles) for s in self._submissions) + (self._carry is not None) + tiles

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve_forever(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, tiles: Array, on_tile_done: Callable[[], None] | None = None) -> list[Array]:
        """(N, ...) inputs -> N outputs, one per tile; `on_tile_done` is called as each tile's output arrives.
        Raises QueueFullError when N more tiles would not fit.

        The outputs are views into their batch's result, not stacked here: a copy on the event loop (most of it page
        faults) holds up every request.
        """
        ahead = self.tiles_ahead(len(tiles))
        if self.depth and ahead > self.max_queue:
            raise QueueFullError(
                f"the service is busy: this request's {len(tiles)} network inputs would wait in turn with "
                f"{ahead - len(tiles)} others ({self.depth} queued), over the limit of {self.max_queue}; retry shortly"
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(tile, loop.create_future()) for tile in tiles]
        if on_tile_done is not None:
            for item in pending:
                item.future.add_done_callback(lambda future: future.cancelled() or on_tile_done())
        submission = deque(pending)
        self._submissions.append(submission)
        self._waiting += len(submission)
        self._arrived.set()
        try:
            return await asyncio.gather(*(p.future for p in pending))
        except asyncio.CancelledError:
            self._withdraw(submission)
            for item in pending:
                item.future.cancel()  # a tile already taken is skipped by the worker, or its output dropped
            raise

    def _withdraw(self, submission: deque[_Pending]) -> None:
        """Take a cancelled request's tiles out of the queue, freeing their places now."""
        with contextlib.suppress(ValueError):
            self._submissions.remove(submission)
            self._waiting -= len(submission)
            self.observe_skipped(len(submission))

    async def _serve_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run_batch(batch)

    async def _next_batch(self) -> list[_Pending]:
        first = self._carry or await self._get(None)
        self._carry = None
        if first.future.cancelled():
            self.observe_skipped(1)
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = await self._get(deadline - time.monotonic())
            except TimeoutError:
                break
            if item.future.cancelled():
                self.observe_skipped(1)
                continue
            if item.tile.shape != batch[0].tile.shape:
                self._carry = item
                break
            batch.append(item)
        return batch

    async def _get(self, timeout: float | None) -> _Pending:
        """The next tile in turn; waits for one (at most `timeout` seconds, else TimeoutError)."""
        while (item := self._take()) is None:
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        return item

    def _take(self) -> _Pending | None:
        """One tile of the submission first in turn, which then goes to the back of the turn."""
        if not self._submissions:
            return None
        submission = self._submissions.popleft()
        item = submission.popleft()
        self._waiting -= 1
        if submission:
            self._submissions.append(submission)
        return item

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

    def _run_stacked(self, tiles: list[Array]) -> Array:
        """Runs in the inference thread, so stacking the inputs does not hold up the event loop either."""
        return self.run(self.stack(tiles))

"""The micro-batcher: tiles of concurrent requests share batches, in turn, and a cancelled request leaves at once."""

import asyncio
import threading

import numpy as np
import pytest

from app.ml.serving.batcher import MicroBatcher, QueueFullError
from app.ml.serving.steps import NumpySteps


class SlowNetwork:
    """Doubles its inputs, one batch at a time, after a gate opens; records the batches it ran."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(timeout=10)
        self.batches.append(batch[:, 0].tolist())
        return batch * 2


def tiles(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)[:, None]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=30))


def test_a_small_request_behind_a_large_one_is_served_in_turn_not_after_it():
    async def scenario() -> list[list[float]]:
        network = SlowNetwork()
        batcher = MicroBatcher(network, NumpySteps().stack, max_batch=2, max_wait=0.0, max_queue=100)
        batcher.start()
        large = asyncio.ensure_future(batcher.submit(tiles(*range(10))))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(batcher.submit(tiles(100, 101)))
        await asyncio.sleep(0.01)
        network.gate.set()
        assert [o.item() for o in await small] == [200, 202]
        assert not large.done()  # the small one finished while the large one still had tiles waiting
        await large
        await batcher.stop()
        return network.batches

    batches = run(scenario())
    first_small = next(i for i, batch in enumerate(batches) if 100 in batch)
    assert first_small <= 2, batches


def test_a_cancelled_request_frees_its_queue_places_at_once():
    async def scenario() -> None:
        network = SlowNetwork()
        batcher = MicroBatcher(network, NumpySteps().stack, max_batch=1, max_wait=0.0, max_queue=8)
        batcher.start()
        blocked = asyncio.ensure_future(batcher.submit(tiles(1)))  # taken by the worker, held at the gate
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(tiles(*range(10, 17))))
        await asyncio.sleep(0.01)
        # Two more would wait in turn with two of the seven: admitted; seven more would wait with all seven: not.
        assert batcher.tiles_ahead(2) == 4 and batcher.tiles_ahead(7) == 14
        with pytest.raises(QueueFullError, match="this request's 7 network inputs would wait in turn with 7 others"):
            await batcher.submit(tiles(*range(7)))
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert batcher.depth == 0
        network.gate.set()
        assert [o.item() for o in await batcher.submit(tiles(5, 6))] == [10, 12]
        await blocked
        await batcher.stop()
        assert network.batches == [[1.0], [5.0], [6.0]]  # none of the cancelled request's tiles ran

    run(scenario())

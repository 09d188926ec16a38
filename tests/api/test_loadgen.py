"""bench's load: many requests at once against the real service, from several client processes above PER_PROCESS."""

from __future__ import annotations

import os

import numpy as np

from app.bench.loadgen import PER_PROCESS, post_from_processes
from tests.api.conftest import png


def test_the_load_comes_from_a_process_per_share_of_the_requests_in_flight_and_every_answer_counts(server):
    image = png((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    in_flight = PER_PROCESS + 2  # two client processes: PER_PROCESS and 2 in flight
    records, wall = post_from_processes(server, image, 15, in_flight, {"format": "json"})
    assert len(records) == 15
    assert all(r["status"] == 200 and "network_ms" in r["timings"] for r in records)
    assert len({r["client"] for r in records}) == 2
    assert max(r["seconds"] for r in records) <= wall


def test_a_few_requests_in_flight_come_from_this_process(server):
    image = png(np.full((64, 64), 128, np.uint8))
    records, _ = post_from_processes(server, image, 3, PER_PROCESS, {"format": "png"})
    assert [r["status"] for r in records] == [200, 200, 200]
    assert {r["client"] for r in records} == {os.getpid()}
    assert all("timings" not in r for r in records)  # timings come with json answers only

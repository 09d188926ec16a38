"""The three stages of a cluster run, each a Ray Data `map_batches` step over the same predictor `predict` uses:

decode (CPU tasks: read the file, decode it, cut it into network inputs) -> Network (actors, on a GPU where the
cluster has them: the network over full batches of inputs from several images) -> finish (CPU tasks: the instance
step, the image's files, then its Kaggle rows, written last as the mark that it is done).

An image that cannot be read or written carries its reason through the later stages instead of stopping the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray

from app.cluster.storage import ROWS_SUFFIX, Location
from app.ml.errors import CellSegError
from app.ml.imageio import ImageLimits, decode_image
from app.ml.options import Backend, DeviceSteps, InferenceOptions, Mode
from app.ml.outputs import OutputFormat, image_files, kaggle_rows, submission_csv
from app.ml.serving.predictor import Predictor, Prepared

Batch = dict[str, np.ndarray]
STAGES = ("decode", "network", "finish")


@dataclass(frozen=True)
class RunSpec:
    """What every stage needs, built once by the driver: the model is in the object store, read once per process."""

    model: ray.ObjectRef  # the Checkpoint
    options: InferenceOptions
    mode: Mode
    formats: tuple[OutputFormat, ...]
    source: Location
    dest: Location
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_batch: int = 8  # network inputs per forward pass, as predict's
    merge_images: bool = False  # forward passes across the images of a batch (Network)


@dataclass
class ImageWork:
    """One image on its way through the stages."""

    image_id: str
    name: str  # its file name in the source
    image: np.ndarray | None = None
    prepared: Prepared | None = None
    outputs: np.ndarray | None = None
    error: str = ""
    cells: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    network_at: float = 0.0  # when its network batch began (time.time(), comparable across nodes with synced clocks)
    finished_at: float = 0.0  # when its files were written


_PREDICTORS: dict[tuple[str, InferenceOptions], Predictor] = {}


def cached_predictor(spec: RunSpec, options: InferenceOptions) -> Predictor:
    """The run's model as `options` say, built once per worker process: Ray reuses processes across tasks."""
    key = (spec.model.hex(), options)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = Predictor.from_checkpoint(ray.get(spec.model), options)
    return _PREDICTORS[key]


def cpu_predictor(spec: RunSpec) -> Predictor:
    """The predictor of the CPU stages: the reference numpy steps around the network, which never runs here."""
    options = replace(
        spec.options, device="cpu", backend=Backend.TORCH, compile=False, steps_on_device=DeviceSteps.NONE
    )
    return cached_predictor(spec, options)


@contextmanager
def timed(work: ImageWork, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        work.seconds[stage] = work.seconds.get(stage, 0.0) + time.perf_counter() - started


def decode(batch: Batch, spec: RunSpec) -> Batch:
    """image ids and file names -> ImageWork with the decoded image and its network inputs, or its reason."""
    predictor = cpu_predictor(spec)
    works = []
    for image_id, name in zip(batch["image_id"], batch["name"], strict=True):
        work = ImageWork(str(image_id), str(name))
        with timed(work, "decode"):
            try:
                work.image = decode_image(spec.source.read(work.name), spec.limits)
                work.prepared = predictor.prepare(work.image, spec.mode)
            except (CellSegError, OSError) as exc:
                work.error = f"{type(exc).__name__}: {exc}"
        works.append(work)
    return {"work": _objects(works)}


class Network:
    """The network in an actor, loaded once (and compiled, when compiling, for the shapes `predict` runs), over the
    batches of images Ray Data hands it.

    Each image's network inputs go through as `predict` sends them (max_batch at a time), so the cells are
    identical to its cells, and the shapes run are those compiled at warm-up: on a CPU batch 1, compiled, is also
    the fastest (docs/performance.md). `merge_images` sends the inputs of the whole batch of images together,
    max_batch at a time, which is what feeds a GPU well; the cells may then differ from `predict`'s in the last bits
    where reduced precision or compiled code computes a batch differently from one input.
    """

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.predictor = Predictor.from_checkpoint(ray.get(spec.model), spec.options)
        if self.predictor.options.compile:
            self.predictor.warm_up()

    def __call__(self, batch: Batch) -> Batch:
        works = [w for w in batch["work"] if not w.error]
        for group in [works] if self.spec.merge_images and works else [[w] for w in works]:
            self.run(group)
        return batch

    def run(self, works: list[ImageWork]) -> None:
        started, now = time.perf_counter(), time.time()
        tiles = np.concatenate([w.prepared.tiles for w in works])
        steps = self.predictor.steps
        outputs = steps.to_numpy(self.predictor.run_tiles(steps.from_numpy(tiles), self.spec.max_batch))
        share = (time.perf_counter() - started) / len(tiles)
        counts = [len(w.prepared.tiles) for w in works]
        for work, part, count in zip(works, np.split(outputs, np.cumsum(counts)[:-1]), counts, strict=True):
            work.outputs = part
            work.prepared = replace(work.prepared, tiles=work.prepared.tiles[:0])  # spent: not carried further
            work.seconds["network"] = share * count
            work.network_at = now


def finish(batch: Batch, spec: RunSpec) -> Batch:
    """ImageWork -> the image's files in the destination, its rows file last; one small result row per image."""
    predictor = cpu_predictor(spec)
    for work in batch["work"]:
        if not work.error:
            with timed(work, "finish"):
                try:
                    write_outputs(work, predictor, spec)
                except (CellSegError, OSError) as exc:
                    work.error = f"{type(exc).__name__}: {exc}"
            work.finished_at = time.time()
    works = batch["work"]
    result: dict[str, list[Any]] = {
        "image_id": [w.image_id for w in works],
        "name": [w.name for w in works],
        "cells": [w.cells for w in works],
        "error": [w.error for w in works],
        "network_at": [w.network_at for w in works],
        "finished_at": [w.finished_at for w in works],
    }
    for stage in STAGES:
        result[f"{stage}_s"] = [w.seconds.get(stage, 0.0) for w in works]
    return {key: np.array(values) for key, values in result.items()}


def write_outputs(work: ImageWork, predictor: Predictor, spec: RunSpec) -> None:
    instances = predictor.finish(work.prepared, work.outputs)
    for name, data in image_files(work.image_id, work.image, instances, list(spec.formats)).items():
        spec.dest.write(name, data)
    spec.dest.write(f"{work.image_id}{ROWS_SUFFIX}", submission_csv(kaggle_rows(work.image_id, instances), False))
    work.cells = instances.count


def _objects(items: list[Any]) -> np.ndarray:
    column = np.empty(len(items), dtype=object)  # np.array(items) would look inside dataclasses with arrays
    column[:] = items
    return column

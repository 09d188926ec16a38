"""Upload bytes -> cells in the format asked for, asynchronously: CPU steps in worker threads, the network through
the micro-batcher.

decode -> preprocess -> network -> instances -> encode (app.ml.outputs), each timed, so a slow stage shows in the
response and in the metrics. A stack (Z, time) is decoded once and its frames are segmented side by side, sharing
micro-batches; json encodes each frame's cells, a file format the one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from app.ml import stopping
from app.ml.errors import InvalidImageError
from app.ml.imageio import FrameLayout, ImageLimits, ImageStack, check_geometry, declared_shape, decode_stack
from app.ml.options import Mode
from app.ml.outputs import STACK_FORMATS, OutputFormat, encode, encode_stack
from app.ml.postprocess import Instances
from app.ml.rules import InstanceRules
from app.ml.serving.batcher import MicroBatcher
from app.ml.serving.budget import PixelBudget
from app.ml.serving.predictor import Predictor, Prepared
from app.ml.serving.tiler import Array

StageObserver = Callable[[str, float], None]
ProgressObserver = Callable[[int, int], None]  # (network inputs done, network inputs known so far)
T = TypeVar("T")


@dataclass
class SegmentedFrame:
    """The cells of one image or frame, the image itself (for overlays), seconds spent per stage, and with json its
    cells encoded (one record each)."""

    image: np.ndarray
    instances: Instances
    mode: Mode
    timings: dict[str, float] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.instances.labels.shape


@dataclass
class SegmentedFile:
    """Every frame of one uploaded file, segmented; a plain image is one frame with no frame axes. `file`: the
    answer's file, for every format but json."""

    frames: list[SegmentedFrame]
    layout: FrameLayout  # the file's frame axes and the channel segmented
    file: bytes = b""

    @property
    def shape(self) -> tuple[int, int]:
        return self.frames[0].shape

    @property
    def mode(self) -> Mode:
        return self.frames[0].mode

    @property
    def cell_count(self) -> int:
        return sum(frame.instances.count for frame in self.frames)


class TileProgress:
    """Counts a request's network inputs, known and done, and tells `report` at each change: for a progress bar."""

    def __init__(self, report: ProgressObserver) -> None:
        self.report, self.done, self.total = report, 0, 0

    def expect(self, tiles: int) -> None:
        self.total += tiles
        self.report(self.done, self.total)

    def tile_done(self) -> None:
        self.done += 1
        self.report(self.done, self.total)


async def all_or_none(work: list[Awaitable[T]]) -> list[T]:
    """Every result, or the first error; then the others' work is cancelled, queued network inputs included, and
    waited for (a step in a thread at most), so no work outlives the answer."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the tasks that finished
        await stopping.until_done(set(tasks))


class SegmentationPipeline:
    """One model's path from uploaded bytes to the answer's cells or file (the module's doc), with the admission
    that guards it: the service's pixel budget and the model's micro-batcher queue."""

    def __init__(
        self,
        predictor: Predictor,
        batcher: MicroBatcher,
        limits: ImageLimits | None = None,
        observe_stage: StageObserver | None = None,
        budget: PixelBudget | None = None,
    ) -> None:
        self.predictor, self.batcher, self.limits = predictor, batcher, limits or ImageLimits()
        self.budget = budget or PixelBudget(self.limits.max_pixels, self.limits.max_pixels)
        self.observe_stage = observe_stage or (lambda stage, seconds: None)

    @property
    def model_version(self) -> str:
        return self.predictor.version

    @property
    def is_full(self) -> bool:
        """No new request could start now: the pixels in flight are at their limit, or even one network input would
        wait longer than the queue allows."""
        return self.budget.used >= self.budget.in_flight or self.batcher.tiles_ahead(1) > self.batcher.max_queue

    async def admit(self, images: list[bytes], mode: Mode) -> contextlib.AbstractContextManager[None]:
        """The images' cost held in the service's pixel budget while inside (see PixelBudget). Their headers are
        read in a thread: a TIFF of many pages takes seconds to count, and the event loop serves others meanwhile."""
        pixels = await stopping.in_thread(lambda: sum(self.cost(data, mode) for data in images))
        return self.budget.reserve(pixels)

    def cost(self, data: bytes, mode: Mode) -> int:
        """Pixels an image will occupy, from its header: its own, or its network inputs' if they are more (an
        image of extreme shape makes many tiles from few pixels)."""
        shape = declared_shape(data, self.limits)
        if shape is None:
            return 0
        height, width, frames = shape
        check_geometry(height, width, frames, self.limits)  # one image's own limits first, with their message
        _, grid = self.predictor.tiler.layout((height, width), mode)
        return frames * max(height * width, grid.num_tiles * grid.tile_in[0] * grid.tile_in[1])

    def rules(self, **overrides: float | int | None) -> InstanceRules:
        """The model's instance step with a request's own thresholds (None: the model's)."""
        return self.predictor.rules.with_overrides(**overrides)

    async def segment(
        self,
        data: bytes,
        mode: Mode,
        rules: InstanceRules,
        channel: str | None = None,
        output: OutputFormat = OutputFormat.JSON,
        progress: TileProgress | None = None,
    ) -> SegmentedFile:
        """Every frame of the file, of `channel` where it has several, encoded in `output`; `progress` counts its
        network inputs. Raises InvalidImageError for bad bytes or a stack asked for in a one-image format, and
        QueueFullError when the service is overloaded."""
        timings: dict[str, float] = {}
        decoded = await stopping.in_thread(self._decode, data, channel, timings)
        if decoded.layout.is_stack and output not in STACK_FORMATS:
            raise InvalidImageError(
                f"the image is a stack of {len(decoded.frames)} frames (axes {decoded.layout.axes}); "
                f"format={output.value} answers one image: ask for format=json or format=tiff for every frame"
            )
        work = [self._segment_frame(image, mode, rules, dict(timings), output, progress) for image in decoded.frames]
        segmented = SegmentedFile(await all_or_none(work), decoded.layout)
        if output is not OutputFormat.JSON:
            segmented.file = await stopping.in_thread(self._encode_file, segmented, output)
        return segmented

    async def _segment_frame(
        self,
        image: np.ndarray,
        mode: Mode,
        rules: InstanceRules,
        timings: dict[str, float],
        output: OutputFormat,
        progress: TileProgress | None,
    ) -> SegmentedFrame:
        prepared = await stopping.in_thread(self._prepare, image, mode, timings)
        started = time.perf_counter()
        if progress is not None:
            progress.expect(len(prepared.tiles))
        outputs = await self.batcher.submit(prepared.tiles, progress and progress.tile_done)
        self._record(timings, "network", started)
        instances = await stopping.in_thread(self._instances, prepared, outputs, rules, timings)
        frame = SegmentedFrame(image=image, instances=instances, mode=prepared.mode, timings=timings)
        if output is OutputFormat.JSON:
            frame.cells = await stopping.in_thread(self._encode_cells, frame)
        return frame

    def _decode(self, data: bytes, channel: str | None, timings: dict[str, float]) -> ImageStack:
        started = time.perf_counter()
        decoded = decode_stack(data, self.limits, channel)
        self._record(timings, "decode", started)
        return decoded

    def _prepare(self, image: np.ndarray, mode: Mode, timings: dict[str, float]) -> Prepared:
        started = time.perf_counter()
        prepared = self.predictor.prepare(image, mode)
        self._record(timings, "preprocess", started)
        return prepared

    def _instances(
        self, prepared: Prepared, outputs: list[Array], rules: InstanceRules, timings: dict[str, float]
    ) -> Instances:
        started = time.perf_counter()
        instances = self.predictor.finish(prepared, self.predictor.steps.stack(outputs), rules)
        self._record(timings, "instances", started)
        return instances

    def _encode_cells(self, frame: SegmentedFrame) -> list[dict[str, Any]]:
        started = time.perf_counter()
        cells = encode(OutputFormat.JSON, frame.image, frame.instances)
        self._record(frame.timings, "encode", started)
        return cells

    def _encode_file(self, segmented: SegmentedFile, output: OutputFormat) -> bytes:
        """The answer's file: a stack's tiff holds every frame, every other file the one image; timed as the first
        frame's 'encode' stage."""
        started = time.perf_counter()
        first = segmented.frames[0]
        if segmented.layout.is_stack:
            layout = segmented.layout
            file = encode_stack([frame.instances.labels for frame in segmented.frames], layout.axes, layout.frame_shape)
        else:
            file = encode(output, first.image, first.instances)
        self._record(first.timings, "encode", started)
        return file

    def _record(self, timings: dict[str, float], stage: str, started: float) -> None:
        timings[stage] = time.perf_counter() - started
        self.observe_stage(stage, timings[stage])

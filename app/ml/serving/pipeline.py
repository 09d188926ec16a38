"""Upload bytes -> cells, asynchronously: CPU steps in worker threads, the network through the micro-batcher.

decode -> preprocess -> network -> instances -> encode, each timed, so a slow stage shows in the response and
in the metrics. A stack (Z, time) is decoded once and its frames are segmented side by side, sharing
micro-batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np

from app.ml import rle
from app.ml.errors import InvalidImageError
from app.ml.exports import coco, geojson, imagej_rois, label_tiff
from app.ml.imageio import FrameLayout, ImageLimits, ImageStack, check_geometry, declared_shape, decode_stack
from app.ml.options import Mode
from app.ml.postprocess import Instances
from app.ml.render import label_png, mask_png, overlay_png
from app.ml.rules import InstanceRules
from app.ml.serving.batcher import MicroBatcher
from app.ml.serving.budget import PixelBudget
from app.ml.serving.predictor import Predictor, Prepared

StageObserver = Callable[[str, float], None]
ProgressObserver = Callable[[int, int], None]  # (network inputs done, network inputs known so far)
T = TypeVar("T")


class OutputFormat(StrEnum):
    """json: per-cell RLE; png: 16-bit label image; mask: 0/255 image; overlay: RGB picture of the cells; tiff:
    label TIFF (Fiji); roi: ImageJ ROI set (zip); geojson: cell polygons (QuPath); coco: COCO annotations with
    compressed RLE (pycocotools)."""

    JSON = "json"
    PNG = "png"
    MASK = "mask"
    OVERLAY = "overlay"
    TIFF = "tiff"
    ROI = "roi"
    GEOJSON = "geojson"
    COCO = "coco"

    @property
    def media_type(self) -> str:
        return _FILES[self][0]

    @property
    def file_suffix(self) -> str:
        """How the name of a file of this format ends, for files written per image (predict --formats)."""
        return _FILES[self][1]


_FILES = {  # format -> (media type, file name ending)
    OutputFormat.JSON: ("application/json", ".json"),
    OutputFormat.PNG: ("image/png", "-labels.png"),
    OutputFormat.MASK: ("image/png", "-mask.png"),
    OutputFormat.OVERLAY: ("image/png", "-overlay.png"),
    OutputFormat.TIFF: ("image/tiff", "-labels.tif"),
    OutputFormat.ROI: ("application/zip", "-rois.zip"),
    OutputFormat.GEOJSON: ("application/geo+json", ".geojson"),
    OutputFormat.COCO: ("application/json", "-coco.json"),
}


@dataclass
class Segmentation:
    """The cells of one image, the image itself (for overlays) and seconds spent per stage."""

    image: np.ndarray
    instances: Instances
    mode: Mode
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.instances.labels.shape


@dataclass
class SegmentedFile:
    """Every frame of one uploaded file, segmented; a plain image is one frame with no frame axes."""

    frames: list[Segmentation]
    layout: FrameLayout  # the file's frame axes and the channel segmented

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


STACK_FORMATS = frozenset({OutputFormat.JSON, OutputFormat.TIFF})  # the formats that carry every frame


async def all_or_none(work: list[Awaitable[T]]) -> list[T]:
    """Every result, or the first error; then the others' work is cancelled, queued network inputs included, so
    no work outlives the answer."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the tasks that finished


def describe_cells(instances: Instances) -> list[dict[str, Any]]:
    """Instances -> one dict per cell: id, Kaggle RLE, area, bbox [x, y, width, height], score."""
    runs = rle.label_runs(instances.labels)
    boxes = rle.bounding_boxes(runs, instances.labels.shape[1]).tolist()
    areas, scores = instances.areas.tolist(), instances.scores.tolist()
    cells = zip(runs.labels.tolist(), rle.encode_runs(runs), boxes, strict=True)
    return [
        {"id": label, "rle": text, "area": areas[label - 1], "bbox": box, "score": round(scores[label - 1], 4)}
        for label, text, box in cells
    ]  # fmt: skip


class SegmentationPipeline:
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

    def admit(self, images: list[bytes], mode: Mode) -> contextlib.AbstractContextManager[None]:
        """Hold the images' cost in the service's pixel budget while inside (see PixelBudget)."""
        return self.budget.reserve(sum(self.cost(data, mode) for data in images))

    def cost(self, data: bytes, mode: Mode) -> int:
        """Pixels an image will occupy, from its header: its own, or its network inputs' if they are more (an
        image of extreme shape makes many tiles from few pixels)."""
        shape = declared_shape(data)
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
        """Every frame of the file, of `channel` where it has several; `progress` counts its network inputs. Raises
        InvalidImageError for bad bytes or a stack asked for in a one-image format, and QueueFullError when the
        service is overloaded."""
        timings: dict[str, float] = {}
        stack = await asyncio.to_thread(self._decode, data, channel, timings)
        if stack.layout.is_stack and output not in STACK_FORMATS:
            raise InvalidImageError(
                f"the image is a stack of {len(stack.frames)} frames (axes {stack.layout.axes}); format={output.value} "
                f"answers one image: ask for format=json or format=tiff for every frame"
            )
        work = [self._segment_frame(image, mode, rules, dict(timings), progress) for image in stack.frames]
        frames = await all_or_none(work)
        return SegmentedFile(frames, stack.layout)

    async def _segment_frame(
        self,
        image: np.ndarray,
        mode: Mode,
        rules: InstanceRules,
        timings: dict[str, float],
        progress: TileProgress | None,
    ) -> Segmentation:
        prepared = await asyncio.to_thread(self._prepare, image, mode, timings)
        started = time.perf_counter()
        if progress is not None:
            progress.expect(len(prepared.tiles))
        outputs = await self.batcher.submit(prepared.tiles, progress and progress.tile_done)
        self._record(timings, "network", started)
        instances = await asyncio.to_thread(self._instances, prepared, outputs, rules, timings)
        return Segmentation(image=image, instances=instances, mode=prepared.mode, timings=timings)

    async def encode(self, segmentation: Segmentation, output: OutputFormat) -> list[dict[str, Any]] | bytes:
        """Cells as dicts (json) or the bytes of a file (every other format); timed as the 'encode' stage."""
        started = time.perf_counter()
        result = await asyncio.to_thread(encode_output, segmentation, output)
        self._record(segmentation.timings, "encode", started)
        return result

    async def encode_file(self, segmented: SegmentedFile, output: OutputFormat) -> bytes:
        """The file of a one-file format: a stack's tiff holds every frame, every other file the one image."""
        if not segmented.layout.is_stack:
            return await self.encode(segmented.frames[0], output)
        started = time.perf_counter()
        result = await asyncio.to_thread(stack_tiff, segmented)
        self._record(segmented.frames[0].timings, "encode", started)
        return result

    def _decode(self, data: bytes, channel: str | None, timings: dict[str, float]) -> ImageStack:
        started = time.perf_counter()
        stack = decode_stack(data, self.limits, channel)
        self._record(timings, "decode", started)
        return stack

    def _prepare(self, image: np.ndarray, mode: Mode, timings: dict[str, float]) -> Prepared:
        started = time.perf_counter()
        prepared = self.predictor.prepare(image, mode)
        self._record(timings, "preprocess", started)
        return prepared

    def _instances(
        self, prepared: Prepared, outputs: list[np.ndarray], rules: InstanceRules, timings: dict[str, float]
    ) -> Instances:
        started = time.perf_counter()
        instances = self.predictor.finish(prepared, self.predictor.steps.stack(outputs), rules)
        self._record(timings, "instances", started)
        return instances

    def _record(self, timings: dict[str, float], stage: str, started: float) -> None:
        timings[stage] = time.perf_counter() - started
        self.observe_stage(stage, timings[stage])


def encode_output(segmentation: Segmentation, output: OutputFormat) -> list[dict[str, Any]] | bytes:
    """The cells of one image in `output`: dicts for json, the file's bytes for every other format."""
    return _ENCODERS[output](segmentation)


def stack_tiff(segmented: SegmentedFile) -> bytes:
    """Every frame's labels in one ImageJ TIFF with the stack's frame axes."""
    labels = np.stack([frame.instances.labels for frame in segmented.frames])
    return label_tiff(labels, segmented.layout.axes, segmented.layout.frame_shape)


_ENCODERS: dict[OutputFormat, Callable[[Segmentation], Any]] = {
    OutputFormat.JSON: lambda s: describe_cells(s.instances),
    OutputFormat.PNG: lambda s: label_png(s.instances.labels),
    OutputFormat.MASK: lambda s: mask_png(s.instances.labels),
    OutputFormat.OVERLAY: lambda s: overlay_png(s.image, s.instances.labels),
    OutputFormat.TIFF: lambda s: label_tiff(s.instances.labels),
    OutputFormat.ROI: lambda s: imagej_rois(s.instances.labels),
    OutputFormat.GEOJSON: lambda s: geojson(s.instances),
    OutputFormat.COCO: lambda s: coco(s.instances),
}

"""One image in, every cell out: the one path of the service, `predict`, `evaluate`, `tune` and validation during
training.

The work is split in three steps so the service can batch the middle one across requests:
`prepare` (the tiler cuts the image into network inputs) -> `run_network` (the runner, on any batch of equal
tiles) -> `finish` (the two maps the instance step reads, stitched and resized to the image's size, then cells).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from app.ml.celltypes import image_contrast
from app.ml.checkpoint import Checkpoint, load_checkpoint
from app.ml.options import Backend, DeviceSteps, Mode, parse_option
from app.ml.postprocess import InstanceConfig, Instances
from app.ml.rules import InstanceRules
from app.ml.serving.runner import NetworkRunner, pick_device, resolve_backend
from app.ml.serving.steps import steps_for
from app.ml.serving.tiler import Array, TileGrid, Tiler
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig

log = logging.getLogger("cellseg.predictor")


def resolve_device_steps(steps: DeviceSteps | str, device: torch.device, backend: Backend) -> DeviceSteps:
    """auto: resize on CUDA, none on the CPU; none wherever ONNX Runtime runs the network (it takes numpy arrays).

    Not all on CUDA: the torch instance step is a long series of small whole-image operations, each a kernel launch,
    and every worker's launches queue on the one GPU, while the reference runs in each worker on a core of its own
    (docs/performance.md has the counts and says what a GPU run must still confirm)."""
    steps = parse_option(DeviceSteps, steps, "steps_on_device")
    if backend is Backend.ONNXRUNTIME:
        return DeviceSteps.NONE
    if steps is DeviceSteps.AUTO:
        return DeviceSteps.RESIZE if device.type == "cuda" else DeviceSteps.NONE
    return steps


class InferenceOptions(Protocol):
    """The inference settings, by the names the service's Settings and the CLIs' arguments both use."""

    device: str
    backend: Backend | str
    half_precision: bool
    compile: bool
    tta: int
    torch_threads: int
    steps_on_device: DeviceSteps | str


@dataclass(frozen=True)
class Prepared:
    """An image made ready for the network: (N, 1, h, w) float32 tiles, how to put them back, and the original
    image's contrast (which the cell-type classifier reads)."""

    tiles: Array
    grid: TileGrid
    original_shape: tuple[int, int]
    contrast: float
    mode: Mode  # the one that ran (auto resolved)


class Predictor:
    """A network with the pre- and postprocessing it was validated with."""

    def __init__(
        self,
        model: UNet,
        preprocess: PreprocessConfig,
        rules: InstanceRules | InstanceConfig,
        device: torch.device | str = "cpu",
        half_precision: bool = False,
        version: str = "unsaved",
        channels_last: bool = True,
        backend: Backend | str = Backend.TORCH,
        compile_network: bool = False,
        tta: int = 1,
        steps_on_device: DeviceSteps | str = DeviceSteps.AUTO,
    ) -> None:
        device = torch.device(device)
        backend = resolve_backend(backend, device, half_precision, compile_network)
        # On CUDA the steps around the network run there too (torch_steps, gpu_instances): the CPU steps, one after
        # another, were the service's bottleneck. On the CPU, 'resize' or 'all' run them in torch there (tests).
        self.steps = steps_for(resolve_device_steps(steps_on_device, device, backend), device)
        self.runner = NetworkRunner(
            model, device, half_precision, backend, compile_network, channels_last, tta, self.steps
        )
        self.tiler = Tiler(preprocess, model.config)
        self.preprocess = preprocess
        self.rules = rules if isinstance(rules, InstanceRules) else InstanceRules(rules)
        self.version = version

    @classmethod
    def from_options(
        cls, source: str | Path | Checkpoint, options: InferenceOptions, compile_network: bool | None = None
    ) -> Predictor:
        """The model of `source` run as the inference settings say: the service's Settings or a CLI's arguments,
        which share their names. compile_network overrides options.compile."""
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        return cls.from_checkpoint(
            source,
            device=options.device,
            half_precision=options.half_precision,
            backend=options.backend,
            compile_network=options.compile if compile_network is None else compile_network,
            tta=options.tta,
            steps_on_device=options.steps_on_device,
        )

    @classmethod
    def from_checkpoint(
        cls,
        source: str | Path | Checkpoint,
        device: str = "auto",
        half_precision: bool = True,
        backend: Backend | str = Backend.TORCH,
        compile_network: bool = False,
        tta: int = 1,
        steps_on_device: DeviceSteps | str = DeviceSteps.AUTO,
    ) -> Predictor:
        """The model of a folder (or a loaded Checkpoint). Reduced precision only where the model card allows it."""
        checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source)
        if parse_option(Backend, backend, "backend") is Backend.ONNXRUNTIME and device == "auto":
            device = "cpu"
        if tta > 1 and tta not in checkpoint.card.postprocessing_by_tta:
            log.warning(
                "%s has no instance step chosen for %d test-time augmentation views: it uses the one chosen "
                "without (`tune --tta %d` chooses one)",
                checkpoint.version,
                tta,
                tta,
            )
        return cls(
            checkpoint.build_model(),
            checkpoint.preprocess,
            checkpoint.card.rules_for_tta(tta),
            device=pick_device(device),
            half_precision=half_precision and checkpoint.card.inference.half_precision,
            version=checkpoint.version,
            backend=backend,
            compile_network=compile_network,
            tta=tta,
            steps_on_device=steps_on_device,
        )

    @property
    def architecture(self) -> UNetConfig:
        return self.tiler.architecture

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def backend(self) -> Backend:
        return self.runner.backend

    @property
    def precision(self) -> str:
        return self.runner.precision

    @property
    def is_compiled(self) -> bool:
        return self.runner.is_compiled

    @property
    def steps_on_device(self) -> DeviceSteps:
        """Which steps around the network run in torch on its device (resolved: none, resize or all)."""
        return self.steps.setting

    # ------------------------------------------------------------------ the three steps

    def prepare(self, image: np.ndarray, mode: Mode | str = Mode.RESIZE) -> Prepared:
        """(H, W) float image in [0, 1] -> Prepared tiles for the network (a tensor on its device when the steps
        around it run there)."""
        tiles, grid, mode = self.steps.cut(self.tiler, image, mode)
        return Prepared(tiles, grid, (image.shape[0], image.shape[1]), image_contrast(image), mode)

    def run_network(self, tiles: Array) -> Array:
        """(N, 1, h, w) float32 -> (N, C, h', w') float32 probabilities (classes, then the centre map if any): numpy
        arrays, or tensors on the network's device where the steps around it run there."""
        return self.runner(tiles)

    def maps(self, prepared: Prepared, outputs: Array) -> Array:
        """Network outputs of `prepared` -> (2, H, W) foreground and seed maps at the original image size (only the
        two maps the instance step reads are resized), where the outputs are."""
        return self.steps.maps(self.tiler, outputs, prepared.grid, prepared.original_shape)

    def finish(self, prepared: Prepared, outputs: Array, rules: InstanceRules | None = None) -> Instances:
        """Network outputs of `prepared` -> Instances at the original image size; with every step on the device,
        the instance step runs there and only the labels and per-cell figures come back."""
        return self.steps.instances(rules or self.rules, self.maps(prepared, outputs), prepared.contrast)

    # ------------------------------------------------------------------ conveniences

    def predict(
        self, image: np.ndarray, mode: Mode | str = Mode.RESIZE, rules: InstanceRules | None = None, max_batch: int = 8
    ) -> Instances:
        """(H, W) float image in [0, 1] -> Instances; the three steps in a row."""
        prepared = self.prepare(image, mode)
        return self.finish(prepared, self.run_tiles(prepared.tiles, max_batch), rules)

    def predict_maps(self, image: np.ndarray, mode: Mode | str = Mode.RESIZE, max_batch: int = 8) -> np.ndarray:
        """(H, W) float image in [0, 1] -> (2, H, W) float32 foreground and seed maps, for choosing thresholds on
        them (a numpy array wherever they were computed)."""
        prepared = self.prepare(image, mode)
        return self.steps.to_numpy(self.maps(prepared, self.run_tiles(prepared.tiles, max_batch)))

    def run_tiles(self, tiles: Array, max_batch: int = 8) -> Array:
        """run_network over any number of tiles, max_batch at a time."""
        chunks = [self.run_network(tiles[i : i + max_batch]) for i in range(0, len(tiles), max_batch)]
        return self.steps.concatenate(chunks)

    def warm_up(self) -> None:
        """Run a blank image through every step in each mode, so no request pays for lazy initialisation
        (exporting the network for each mode's input size with ONNX Runtime, compiling it with torch.compile)."""
        with self.runner.warming():
            # One tile at a time: the CPU service's micro-batches hold 1, the shape to compile.
            for mode in (Mode.RESIZE, Mode.TILE):
                self.predict(np.full((64, 64), 0.5, dtype=np.float32), mode, max_batch=1)

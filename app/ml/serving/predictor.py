"""One image in, every cell out: the one path of the service, `predict`, `evaluate`, `tune` and validation during
training.

The work is split in three steps so the service can batch the middle one across requests:
`prepare` (the tiler cuts the image into network inputs) -> `run_network` (the runner, on any batch of equal
tiles) -> `finish` (the two maps the instance step reads, stitched and resized to the image's size, then cells).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.ml.celltypes import image_contrast
from app.ml.checkpoint import Checkpoint, load_checkpoint
from app.ml.options import InferenceOptions, Mode
from app.ml.postprocess import InstanceConfig, Instances
from app.ml.rules import InstanceRules
from app.ml.serving.runner import NetworkRunner
from app.ml.serving.tiler import Array, TileGrid, Tiler
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig

log = logging.getLogger("cellseg.predictor")


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
        options: InferenceOptions,
        version: str = "unsaved",
        channels_last: bool = True,
    ) -> None:
        """`model` run as `options` say, on this machine (`self.options`: resolved). On CUDA the steps around the
        network run there too by default (torch_steps, gpu_instances): the CPU steps, one after another, were the
        service's bottleneck."""
        self.runner = NetworkRunner(model, options, channels_last)
        self.options, self.steps = self.runner.options, self.runner.steps
        self.tiler = Tiler(preprocess, model.config)
        self.preprocess = preprocess
        self.rules = rules if isinstance(rules, InstanceRules) else InstanceRules(rules)
        self.version = version

    @classmethod
    def from_checkpoint(cls, source: str | Path | Checkpoint, options: InferenceOptions) -> Predictor:
        """The model of a folder (or a loaded Checkpoint), run as `options` say: reduced precision only where its
        model card allows it, and the instance step its card holds for `options.tta` views."""
        checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source)
        tta = options.tta
        if tta > 1 and tta not in checkpoint.card.postprocessing_by_tta:
            log.warning(
                "%s has no instance step chosen for %d test-time augmentation views: it uses the one chosen "
                "without (`tune --tta %d` chooses one)",
                checkpoint.version,
                tta,
                tta,
            )
        allowed = options.half_precision and checkpoint.card.inference.half_precision
        return cls(
            checkpoint.build_model(),
            checkpoint.preprocess,
            checkpoint.card.rules_for_tta(tta),
            replace(options, half_precision=allowed),
            version=checkpoint.version,
        )

    @property
    def architecture(self) -> UNetConfig:
        return self.tiler.architecture

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def precision(self) -> str:
        """What the network computes in: float32, float16 (CUDA) or bfloat16 (CPU); `options.half_precision` on
        this machine."""
        return self.runner.precision

    @property
    def compiled(self) -> bool:
        """Whether the network runs through torch.compile (`options.compile`, once warmed up)."""
        return self.runner.compiled

    def how_it_runs(self) -> dict[str, Any]:
        """Where and how the network runs, by the names /ready, GET /models and the log give them."""
        options = self.options
        return {
            "device": str(self.device),
            "backend": options.backend.value,
            "precision": self.precision,
            "compiled": self.compiled,
            "tta": options.tta,
        }

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

"""One image in, every cell out: the path shared by the service, validation during training, and the CLIs.

The work is split in three steps so the service can batch the middle one across requests:
`prepare` (normalize, resize or rescale, cut into tiles) -> `run_network` (any batch of equal tiles) ->
`finish` (stitch, resize back to the original size, instances).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.ml.celltypes import InstanceRules, image_contrast
from app.ml.checkpoint import Checkpoint, load_checkpoint
from app.ml.errors import InvalidOptionError
from app.ml.options import Backend, Mode, parse_option
from app.ml.postprocess import InstanceConfig, Instances, instance_maps
from app.ml.serving.compiled import CompiledNetwork
from app.ml.serving.onnx_backend import OnnxRuntimeNetwork, onnxruntime_available
from app.ml.transforms import (
    PreprocessConfig,
    TileGrid,
    extract_tiles,
    normalize,
    resize_image,
    scaled_size,
    stitch_tiles,
)
from app.ml.unet import UNet, to_probabilities


@dataclass(frozen=True)
class Prepared:
    """An image made ready for the network: (N, 1, h, w) float32 tiles, how to put them back, and the original
    image's contrast (which the cell-type classifier reads)."""

    tiles: np.ndarray
    grid: TileGrid
    original_shape: tuple[int, int]
    contrast: float


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Intel AMX tiles). There bench measured the network
    several times faster under bfloat16 autocast than in float32, with the same validation score
    (docs/performance.md); without AMX, bfloat16 brings little or is emulated."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
    return bool(amx and amx())


def auto_backend(device: torch.device, half: bool, compile_network: bool = False) -> Backend:
    """What backend auto resolves to: PyTorch on CUDA, on CPUs where reduced precision (allowed by `half`) runs
    natively, and when the network is to be compiled (compiled PyTorch beat ONNX Runtime in float32 in bench);
    else ONNX Runtime when installed (float32 uncompiled, about as fast as PyTorch); else PyTorch."""
    if device.type != "cpu" or (half and native_bfloat16()) or compile_network or not onnxruntime_available():
        return Backend.TORCH
    return Backend.ONNXRUNTIME


class Predictor:
    """A network with the pre- and postprocessing it was validated with."""

    def __init__(
        self,
        model: UNet,
        preprocess: PreprocessConfig,
        instances: InstanceRules | InstanceConfig,
        device: torch.device | str = "cpu",
        half: bool = False,
        version: str = "unsaved",
        channels_last: bool = True,
        backend: Backend | str = Backend.TORCH,
        compile_network: bool = False,
        tta: int = 1,
    ) -> None:
        if tta not in TTA_VIEWS:
            raise InvalidOptionError(f"tta={tta}: test-time augmentation takes {', '.join(map(str, TTA_VIEWS))} views")
        self.tta = tta
        self.device = torch.device(device)
        self.backend = parse_option(Backend, backend, "backend")
        if self.backend is Backend.AUTO:
            self.backend = auto_backend(self.device, half, compile_network)
        if self.backend is Backend.ONNXRUNTIME and self.device.type != "cpu":
            raise InvalidOptionError(f"the onnxruntime backend runs on the CPU, not {self.device}; use backend torch")
        # Reduced precision where the hardware has it: float16 weights on CUDA, bfloat16 autocast on AMX CPUs.
        self.half = half and self.device.type == "cuda"
        self.bfloat16 = half and self.device.type == "cpu" and self.backend is Backend.TORCH and native_bfloat16()
        # channels_last runs the CPU's convolutions faster (docs/performance.md). Training validation turns it
        # off, so validating never changes the layout of the weights being trained.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        if self.half:
            self.model.half()
        self.config = model.config
        self.onnx = (
            OnnxRuntimeNetwork(self.model, torch.get_num_threads()) if self.backend is Backend.ONNXRUNTIME else None
        )
        # torch.compile where it was measured to pay off: PyTorch on the CPU (CUDA has not been measured).
        compiles = compile_network and self.backend is Backend.TORCH and self.device.type == "cpu"
        self.compiled = CompiledNetwork(self.model) if compiles else None
        self.preprocess = preprocess
        self.instances = instances if isinstance(instances, InstanceRules) else InstanceRules(instances)
        self.version = version

    @classmethod
    def from_checkpoint(
        cls,
        source: str | Path | Checkpoint,
        device: str = "auto",
        half: bool = True,
        backend: Backend | str = "torch",
        compile_network: bool = False,
        tta: int = 1,
    ) -> Predictor:
        checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source)
        if parse_option(Backend, backend, "backend") is Backend.ONNXRUNTIME and device == "auto":
            device = "cpu"
        return cls(
            checkpoint.build_model(),
            checkpoint.preprocess,
            checkpoint.instances,
            device=pick_device(device),
            half=half and checkpoint.card.inference.half_precision,
            version=checkpoint.version,
            backend=backend,
            compile_network=compile_network,
            tta=tta,
        )

    @property
    def precision(self) -> str:
        """The number format the network computes in: float32, float16 (CUDA) or bfloat16 (CPU)."""
        return "float16" if self.half else "bfloat16" if self.bfloat16 else "float32"

    @property
    def is_compiled(self) -> bool:
        """Whether the network runs through torch.compile (for the shapes compiled while warming up)."""
        return self.compiled is not None and bool(self.compiled.shapes)

    # ------------------------------------------------------------------ the three steps

    def prepare(self, image: np.ndarray, mode: Mode | str = Mode.RESIZE) -> Prepared:
        """(H, W) float image in [0, 1] -> Prepared tiles for the network."""
        mode = _parse_mode(mode)
        working = resize_image(image, self.working_size(image.shape, mode))
        grid = self.grid(working.shape, mode)
        tiles = extract_tiles(normalize(working), grid)[:, None]
        return Prepared(
            tiles=tiles, grid=grid, original_shape=(image.shape[0], image.shape[1]), contrast=image_contrast(image)
        )

    def run_network(self, tiles: np.ndarray) -> np.ndarray:
        """(N, 1, h, w) float32 -> (N, C, h', w') float32 probabilities (classes, then the centre map if any).

        With test-time augmentation, the mean of the probabilities of `tta` flipped or turned views, each turned
        back: one batch of N x tta inputs through the network.
        """
        if self.tta == 1:
            return self._probabilities(tiles)
        views = TTA_VIEWS[self.tta]
        batch = np.concatenate([np.ascontiguousarray(forward(tiles)) for forward, _ in views])
        outputs = np.split(self._probabilities(batch), len(views))
        return np.mean([inverse(out) for (_, inverse), out in zip(views, outputs, strict=True)], axis=0)

    @torch.inference_mode()
    def _probabilities(self, tiles: np.ndarray) -> np.ndarray:
        if self.onnx is not None:
            logits = torch.from_numpy(self.onnx(tiles))
        else:
            batch = torch.from_numpy(tiles).to(self.device, memory_format=self.memory_format, non_blocking=True)
            network = self.compiled or self.model
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bfloat16):
                logits = network(batch.half() if self.half else batch).float()
        return to_probabilities(logits, self.config.num_classes).cpu().numpy()

    def finish(self, prepared: Prepared, outputs: np.ndarray, rules: InstanceRules | None = None) -> Instances:
        """Network outputs of `prepared` -> Instances at the original image size."""
        maps = resize_image(stitch_tiles(instance_maps(outputs), prepared.grid), prepared.original_shape)
        return (rules or self.instances).find(maps, prepared.contrast)

    def probabilities(self, prepared: Prepared, outputs: np.ndarray) -> np.ndarray:
        """Network outputs of `prepared` -> (C, H, W) probabilities at the original image size."""
        return resize_image(stitch_tiles(outputs, prepared.grid), prepared.original_shape)

    # ------------------------------------------------------------------ conveniences

    def predict(
        self,
        image: np.ndarray,
        mode: Mode | str = Mode.RESIZE,
        rules: InstanceRules | None = None,
        max_batch: int = 8,
    ) -> Instances:
        """(H, W) float image in [0, 1] -> Instances; the three steps in a row."""
        probs = self.predict_probabilities(image, mode, max_batch)
        return (rules or self.instances).from_probabilities(probs, image_contrast(image))

    def predict_probabilities(
        self, image: np.ndarray, mode: Mode | str = Mode.RESIZE, max_batch: int = 8
    ) -> np.ndarray:
        """(H, W) float image in [0, 1] -> (C, H, W) class probabilities at the image's size."""
        prepared = self.prepare(image, mode)
        return self.probabilities(prepared, self.run_tiles(prepared.tiles, max_batch))

    def run_tiles(self, tiles: np.ndarray, max_batch: int = 8) -> np.ndarray:
        """run_network over any number of tiles, max_batch at a time."""
        chunks = [self.run_network(tiles[i : i + max_batch]) for i in range(0, len(tiles), max_batch)]
        return np.concatenate(chunks)

    def warm_up(self) -> None:
        """Run a blank image through every step in each mode, so no request pays for lazy initialisation
        (exporting the network for each mode's input size with ONNX Runtime, compiling it with torch.compile)."""
        with self.compiled.warming() if self.compiled else contextlib.nullcontext():
            for mode in Mode:  # one tile at a time: the CPU service's micro-batches hold 1, the shape to compile
                self.predict(np.full((64, 64), 0.5, dtype=np.float32), mode, max_batch=1)

    # ------------------------------------------------------------------ geometry

    def working_size(self, shape: tuple[int, ...], mode: Mode | str) -> tuple[int, int]:
        """The (H, W) the image is resized to before tiling."""
        if _parse_mode(mode) is Mode.RESIZE:
            return self.preprocess.input_size, self.preprocess.input_size
        return scaled_size((shape[0], shape[1]), self.preprocess.pixel_scale)

    def grid(self, shape: tuple[int, int], mode: Mode | str) -> TileGrid:
        """How the working image is tiled for this network.

        The unpadded paper network always uses the paper's overlap-tile (572 in, 388 out). The padded one sees
        the whole resized image at once in resize mode (mirrored up to a multiple of its stride), and tiles of
        tile_size with tile_margin of context in tile mode.
        """
        if not self.config.padded:
            size = self.preprocess.input_size
            out = self.config.output_size(size)
            return TileGrid(shape=shape, tile_out=(out, out), margin=(size - out) // 2)
        if _parse_mode(mode) is Mode.RESIZE:
            stride = self.config.stride
            return TileGrid(shape=shape, tile_out=tuple(math.ceil(s / stride) * stride for s in shape), margin=0)
        out = self.preprocess.tile_size - 2 * self.preprocess.tile_margin
        return TileGrid(shape=shape, tile_out=(out, out), margin=self.preprocess.tile_margin)


def _view(turns: int, flip: bool) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """(forward, inverse) on (..., h, w) arrays: `turns` quarter turns, then a left-right flip if `flip`."""

    def forward(array: np.ndarray) -> np.ndarray:
        turned = np.rot90(array, turns, axes=(-2, -1))
        return turned[..., ::-1] if flip else turned

    def inverse(array: np.ndarray) -> np.ndarray:
        return np.rot90(array[..., ::-1] if flip else array, -turns, axes=(-2, -1))

    return forward, inverse


# Test-time augmentation: 1 view (off), 4 (the flips: none, left-right, up-down, both), or 8 (every symmetry of
# the square, for square network inputs: resize mode and tiles always are).
TTA_VIEWS = {
    1: [_view(0, False)],
    4: [_view(0, False), _view(0, True), _view(2, True), _view(2, False)],
    8: [_view(turns, flip) for turns in range(4) for flip in (False, True)],
}


def _parse_mode(mode: Mode | str) -> Mode:
    return parse_option(Mode, mode, "mode")

"""The network runner: where and how the network computes (device, backend, precision, memory format, compile,
test-time augmentation), chosen once, behind one call from tiles to probabilities."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from app.ml.errors import InvalidOptionError
from app.ml.options import Backend, parse_option
from app.ml.serving.compiled import CompiledNetwork
from app.ml.serving.onnx_backend import OnnxRuntimeNetwork, onnxruntime_available
from app.ml.serving.steps import NumpySteps, Steps
from app.ml.serving.tiler import Array
from app.ml.unet import UNet, to_probabilities


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: Intel AMX tiles, or the AVX-512 BF16 instructions (AMD
    Zen 4 and later, Intel Cooper Lake). There the network runs much faster under bfloat16 autocast than in float32
    and scores about the same (docs/performance.md); elsewhere bfloat16 is emulated."""
    names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private functions, hence the guard
    checks = [getattr(torch.cpu, name, None) for name in names]
    return any(check is not None and bool(check()) for check in checks)


def auto_backend(device: torch.device, half_precision: bool, compile_network: bool = False) -> Backend:
    """What backend auto resolves to: PyTorch on CUDA, on CPUs where reduced precision (allowed by
    `half_precision`) runs natively, and when the network is to be compiled (compiled PyTorch beat ONNX Runtime in
    float32 in bench); else ONNX Runtime when installed (float32 uncompiled, about as fast as PyTorch); else
    PyTorch."""
    if device.type != "cpu" or (half_precision and native_bfloat16()) or compile_network:
        return Backend.TORCH
    return Backend.ONNXRUNTIME if onnxruntime_available() else Backend.TORCH


def resolve_backend(
    backend: Backend | str, device: torch.device, half_precision: bool, compile_network: bool = False
) -> Backend:
    """The backend that runs: `backend`, or auto_backend's for auto."""
    backend = parse_option(Backend, backend, "backend")
    return auto_backend(device, half_precision, compile_network) if backend is Backend.AUTO else backend


View = tuple[Callable[[Array], Array], Callable[[Array], Array]]


def view(steps: Steps, turns: int, flip: bool) -> View:
    """(forward, inverse) on (..., h, w) arrays of `steps`' kind: `turns` quarter turns, then a left-right flip if
    `flip`."""

    def forward(array: Array) -> Array:
        turned = steps.turned(array, turns)
        return steps.flipped(turned) if flip else turned

    def inverse(array: Array) -> Array:
        return steps.turned(steps.flipped(array) if flip else array, -turns)

    return forward, inverse


# Test-time augmentation, as (quarter turns, left-right flip) views: 1 view (off), 2 (and its left-right flip),
# 4 (the flips: none, left-right, up-down, both), or 8 (every symmetry of the square, for square network inputs:
# resize mode and tiles always are).
TTA_VIEWS = {
    1: [(0, False)],
    2: [(0, False), (0, True)],
    4: [(0, False), (0, True), (2, True), (2, False)],
    8: [(turns, flip) for turns in range(4) for flip in (False, True)],
}


class NetworkRunner:
    """(N, 1, h, w) float32 tiles -> (N, C, h', w') float32 probabilities (the classes, then the centre map if
    the model has one), the same whatever runs them."""

    def __init__(
        self,
        model: UNet,
        device: torch.device | str = "cpu",
        half_precision: bool = False,
        backend: Backend | str = Backend.TORCH,
        compile_network: bool = False,
        channels_last: bool = True,
        tta: int = 1,
        steps: Steps | None = None,
    ) -> None:
        if tta not in TTA_VIEWS:
            raise InvalidOptionError(f"tta={tta}: test-time augmentation takes {', '.join(map(str, TTA_VIEWS))} views")
        self.tta, self.device, self.config = tta, torch.device(device), model.config
        # Arrays in and out, or tensors on the device (the steps around the network there): the predictor's choice.
        self.steps = steps or NumpySteps()
        self.views = [view(self.steps, turns, flip) for turns, flip in TTA_VIEWS[tta]]
        if self.device.type == "cuda":  # few input shapes, each seen again and again: cuDNN's autotuning pays
            torch.backends.cudnn.benchmark = True
        self.backend = resolve_backend(backend, self.device, half_precision, compile_network)
        if self.backend is Backend.ONNXRUNTIME and self.device.type != "cpu":
            raise InvalidOptionError(f"the onnxruntime backend runs on the CPU, not {self.device}; use backend torch")
        # Reduced precision where the hardware has it: float16 weights on CUDA, bfloat16 autocast on CPUs
        # with native bfloat16 (native_bfloat16).
        self.half = half_precision and self.device.type == "cuda"
        cpu_torch = self.device.type == "cpu" and self.backend is Backend.TORCH
        self.bfloat16 = half_precision and cpu_torch and native_bfloat16()
        # channels_last runs the CPU's convolutions faster (docs/performance.md). Training validation turns it
        # off, so validating never changes the layout of the weights being trained.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        if self.half:
            self.model.half()
        onnx = self.backend is Backend.ONNXRUNTIME
        self.onnx = OnnxRuntimeNetwork(self.model, torch.get_num_threads()) if onnx else None
        # torch.compile where it was measured to pay off: PyTorch on the CPU (CUDA has not been measured).
        self.compiled = CompiledNetwork(self.model) if compile_network and cpu_torch else None

    @property
    def precision(self) -> str:
        """The number format the network computes in: float32, float16 (CUDA) or bfloat16 (CPU)."""
        return "float16" if self.half else "bfloat16" if self.bfloat16 else "float32"

    @property
    def is_compiled(self) -> bool:
        """Whether the network runs through torch.compile (for the shapes compiled while warming up)."""
        return self.compiled is not None and bool(self.compiled.shapes)

    def warming(self) -> contextlib.AbstractContextManager[None]:
        """While inside, each new input shape is compiled (when compiling is on)."""
        return self.compiled.warming() if self.compiled else contextlib.nullcontext()

    def __call__(self, tiles: Array) -> Array:
        """With test-time augmentation, the mean of the probabilities of `tta` flipped or turned views, each turned
        back: one batch of N x tta inputs through the network. Numpy arrays in and out, or tensors on the network's
        device (the steps after it run there too), as the runner's steps say."""
        if self.tta == 1:
            return self._probabilities(tiles)
        steps, views = self.steps, self.views
        batch = steps.concatenate([steps.contiguous(forward(tiles)) for forward, _ in views])
        outputs = steps.split(self._probabilities(batch), len(views))
        return steps.mean([inverse(out) for (_, inverse), out in zip(views, outputs, strict=True)])

    @torch.inference_mode()
    def _probabilities(self, tiles: Array) -> Array:
        if self.onnx is not None:
            logits = torch.from_numpy(self.onnx(tiles))  # numpy only: its steps never run on a device
        else:
            batch = self.steps.to_tensor(tiles).to(self.device, memory_format=self.memory_format, non_blocking=True)
            network = self.compiled or self.model
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bfloat16):
                logits = network(batch.half() if self.half else batch).float()
        return self.steps.from_tensor(to_probabilities(logits, self.config.num_classes))

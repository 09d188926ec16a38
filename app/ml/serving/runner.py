"""The network runner: where and how the network computes (the InferenceOptions, resolved for this machine, and the
memory format), chosen once, behind one call from tiles to probabilities."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace

import torch

from app.ml.errors import InvalidOptionError
from app.ml.options import TTA_VIEWS, Backend, DeviceSteps, InferenceOptions, parse_option
from app.ml.serving.compiled import CompiledNetwork
from app.ml.serving.onnx_backend import OnnxRuntimeNetwork, onnxruntime_available
from app.ml.serving.steps import Steps, steps_for
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


def auto_backend(device: torch.device, half_precision: bool, compile: bool = False) -> Backend:
    """What backend auto resolves to: PyTorch on CUDA, on CPUs where reduced precision (allowed by
    `half_precision`) runs natively, and when the network is to be compiled (compiled PyTorch beat ONNX Runtime in
    float32 in bench); else ONNX Runtime when installed (float32 uncompiled, about as fast as PyTorch); else
    PyTorch."""
    if device.type != "cpu" or (half_precision and native_bfloat16()) or compile:
        return Backend.TORCH
    return Backend.ONNXRUNTIME if onnxruntime_available() else Backend.TORCH


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


def resolve(options: InferenceOptions) -> InferenceOptions:
    """The options as they apply on this machine: the device picked (the CPU for ONNX Runtime), the backend auto
    chose, reduced precision and compiling on only where they run, the steps on the device resolved. Resolving
    resolved options changes nothing."""
    onnx_on_auto = options.backend is Backend.ONNXRUNTIME and options.device == "auto"
    device = pick_device("cpu" if onnx_on_auto else options.device)
    backend = options.backend
    if backend is Backend.AUTO:
        backend = auto_backend(device, options.half_precision, options.compile)
    cpu_torch = device.type == "cpu" and backend is Backend.TORCH
    # Reduced precision where the hardware has it: float16 weights on CUDA, bfloat16 autocast on CPUs with native
    # bfloat16 (native_bfloat16). torch.compile where it was measured to pay off: PyTorch on the CPU.
    half_precision = options.half_precision and (device.type == "cuda" or (cpu_torch and native_bfloat16()))
    return replace(
        options,
        device=str(device),
        backend=backend,
        half_precision=half_precision,
        compile=options.compile and cpu_torch,
        steps_on_device=resolve_device_steps(options.steps_on_device, device, backend),
    )


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


class NetworkRunner:
    """(N, 1, h, w) float32 tiles -> (N, C, h', w') float32 probabilities (the classes, then the centre map if
    the model has one), the same whatever runs them."""

    def __init__(self, model: UNet, options: InferenceOptions, channels_last: bool = True) -> None:
        options = self.options = resolve(options)
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        self.device, self.config = torch.device(options.device), model.config
        # Arrays in and out, or tensors on the device: the steps around the network, which the predictor uses too.
        self.steps = steps_for(options.steps_on_device, self.device)
        self.views = [view(self.steps, turns, flip) for turns, flip in TTA_VIEWS[options.tta]]
        if self.device.type == "cuda":  # few input shapes, each seen again and again: cuDNN's autotuning pays
            torch.backends.cudnn.benchmark = True
        if options.backend is Backend.ONNXRUNTIME and self.device.type != "cpu":
            raise InvalidOptionError(f"the onnxruntime backend runs on the CPU, not {self.device}; use backend torch")
        float16 = options.half_precision and self.device.type == "cuda"
        self.precision = "float16" if float16 else "bfloat16" if options.half_precision else "float32"
        # channels_last runs the CPU's convolutions faster (docs/performance.md). Training validation turns it
        # off, so validating never changes the layout of the weights being trained.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        if float16:
            self.model.half()
        onnx = options.backend is Backend.ONNXRUNTIME
        self.onnx = OnnxRuntimeNetwork(self.model, torch.get_num_threads()) if onnx else None
        self.compiled_network = CompiledNetwork(self.model) if options.compile else None

    @property
    def compiled(self) -> bool:
        """Whether the network runs through torch.compile (for the shapes compiled while warming up)."""
        return self.compiled_network is not None and bool(self.compiled_network.shapes)

    def warming(self) -> contextlib.AbstractContextManager[None]:
        """While inside, each new input shape is compiled (when compiling is on)."""
        return self.compiled_network.warming() if self.compiled_network else contextlib.nullcontext()

    def __call__(self, tiles: Array) -> Array:
        """With test-time augmentation, the mean of the probabilities of `tta` flipped or turned views, each turned
        back: one batch of N x tta inputs through the network. Numpy arrays in and out, or tensors on the network's
        device (the steps after it run there too), as the runner's steps say."""
        if len(self.views) == 1:
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
            network = self.compiled_network or self.model
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
                logits = network(batch.half() if self.precision == "float16" else batch).float()
        return self.steps.from_tensor(to_probabilities(logits, self.config.num_classes))

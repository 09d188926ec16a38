"""The network alone: the matmul ceiling in each precision, the default model in each way the service may run it,
and the paper's U-Net (on CUDA beside NVIDIA's published figure), at batch 1 and its best batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.bench.timing import best_of, synchronized
from app.ml.options import InferenceOptions, Mode
from app.ml.postprocess import InstanceConfig
from app.ml.serving.onnx_backend import onnxruntime_available
from app.ml.serving.predictor import Predictor
from app.ml.serving.runner import native_bfloat16
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig

# NVIDIA's published inference figure for the paper's U-Net at 572x572 (the reference).
REFERENCE_A100 = {"network": "U-Net 572x572", "gpu": "A100", "precision": "float16", "batch": 16, "images_per_s": 424}


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, tf32: bool = False) -> float:
    """Achieved GFLOP/s of a large square matmul in `dtype` on `device`: what this hardware can do at best. `tf32`:
    float32 through TF32 tensor cores (CUDA), as PyTorch runs float32 convolutions by default, not matmuls.

    On the CPU the same product is also run as a 1x1 convolution, through oneDNN as the network's convolutions are,
    and the faster of the two counts: PyTorch's float32 matmul goes through MKL, which takes a slow path on AMD CPUs,
    so there the matmul alone reads below what the network itself reaches.
    """
    size = 8192 if device.type == "cuda" else 2048  # a GPU needs the larger one to fill its cores
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        seconds = best_of(lambda: synchronized(device, a @ b), 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    if device.type == "cpu":
        with torch.inference_mode():
            seconds = min(seconds, best_of(gemm_as_convolution(a, b), 10))
    return 2 * size**3 / seconds / 1e9


def gemm_as_convolution(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A call computing a @ b as a 1x1 convolution, a's rows as pixels and b's columns as output channels; it
    returns (1, columns, 1, rows): the product transposed."""
    pixels = a.t().reshape(1, a.shape[1], 1, a.shape[0]).contiguous(memory_format=torch.channels_last)
    weight = b.t().reshape(b.shape[1], b.shape[0], 1, 1).contiguous(memory_format=torch.channels_last)
    return lambda: torch.nn.functional.conv2d(pixels, weight)


def conv_flops(config: UNetConfig, input_shape: tuple[int, ...]) -> float:
    """Floating-point operations of one forward pass of a U-Net, counting convolutions (2 per multiply-add);
    counted from shapes alone, on PyTorch's meta device, whatever device and precision it is measured in."""
    with torch.device("meta"):
        model, total = UNet(config), 0.0

    def count(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, nn.ConvTranspose2d):
            total += 2.0 * inputs[0].numel() * module.out_channels * k
        else:
            total += 2.0 * output.numel() * module.in_channels * k // module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    with torch.inference_mode():
        model(torch.zeros(input_shape, device="meta"))
    for hook in hooks:
        hook.remove()
    return total / input_shape[0]


def network_figures(
    predictor: Predictor, flops: float, side: int, batches: list[int], repeats: int, ceiling: float
) -> dict:
    """ms per image and GFLOP/s at each batch size of the predictor's run_network on (N, 1, side, side) inputs,
    each batch copied in from host memory and its probabilities copied back, whichever steps the predictor runs."""
    steps = predictor.steps

    def run(x: np.ndarray) -> np.ndarray:
        return steps.to_numpy(predictor.run_network(steps.from_numpy(x)))

    rows = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 1, side, side), dtype=np.float32)
        seconds = best_of(lambda x=x: run(x), repeats) / batch
        rows[batch] = {
            "ms_per_image": seconds * 1000,
            "images_per_s": 1 / seconds,
            "gflops": flops / seconds / 1e9,
            "of_matmul_ceiling": flops / seconds / 1e9 / ceiling,
        }
    best = max(rows, key=lambda b: rows[b]["images_per_s"])
    return {"input": side, "gflop_per_image": flops / 1e9, "batches": rows, "best_batch": best}


def ceilings(device: torch.device) -> dict[str, float]:
    """Matmul GFLOP/s in float32, and in the reduced precision the service uses on this device, if any."""
    figures = {"matmul_gflops": matmul_gflops(device)}
    if device.type == "cuda":
        figures["matmul_gflops_tf32"] = matmul_gflops(device, tf32=True)
        figures["matmul_gflops_float16"] = matmul_gflops(device, torch.float16)
    elif native_bfloat16():
        figures["matmul_gflops_bfloat16"] = matmul_gflops(device, torch.bfloat16)
    return figures


def network_variants(folder: Path, device: torch.device, quick: bool) -> dict[str, tuple[Predictor, str, list[int]]]:
    """name -> (predictor, the ceiling it is measured against, batch sizes): each way the service may run the
    default model on `device`. Compiled networks only at batch 1, the shape the CPU service compiles while
    warming up (any other batch would run uncompiled); on CUDA, where the service does not compile, up to 16."""
    exact = InferenceOptions.float32(str(device))

    def load(**options: Any) -> Predictor:
        return Predictor.from_checkpoint(folder, replace(exact, **options))

    if device.type == "cuda":
        batches = [1, 4, 16] if quick else [1, 2, 4, 8, 16]
        return {
            "network_default": (load(), float32_ceiling(device), batches),
            "network_default_float16": (load(half_precision=True), "matmul_gflops_float16", batches),
        }
    batches = [1, 2, 4] if quick else [1, 2, 4, 8]
    variants = {
        "network_default": (load(), "matmul_gflops", batches),
        "network_default_compiled": (load(compile=True), "matmul_gflops", [1]),
    }
    if native_bfloat16():
        variants["network_default_bfloat16"] = (load(half_precision=True), "matmul_gflops_bfloat16", batches)
        variants["network_default_bfloat16_compiled"] = (
            load(half_precision=True, compile=True),
            "matmul_gflops_bfloat16",
            [1],
        )
    if onnxruntime_available():
        variants["network_default_onnxruntime"] = (load(backend="onnxruntime"), "matmul_gflops", batches)
    return variants


def float32_ceiling(device: torch.device) -> str:
    """The ceiling a float32 network is measured against: on CUDA, PyTorch runs float32 convolutions on TF32
    tensor cores (unless turned off), so a plain float32 matmul is no ceiling for them."""
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return "matmul_gflops_tf32" if tf32 else "matmul_gflops"


@contextlib.contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """While inside, cuDNN benchmarks its convolution algorithms for each new input shape (or not)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def network_section(folder: Path, device: torch.device, result: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The default model in each of its variants, and the paper's U-Net with random weights: on CUDA in float16
    at batch 16 as well, the setting of NVIDIA's published figure (REFERENCE_A100), and the float16 model without
    cuDNN's autotuning, which the service turns on for CUDA."""
    figures: dict[str, Any] = {}
    repeats = 3 if quick else 5
    for name, (predictor, ceiling, batches) in network_variants(folder, device, quick).items():
        predictor.warm_up()  # compiles the network for the input shapes the service uses
        side = predictor.prepare(np.zeros((520, 704), np.float32), Mode.RESIZE).tiles.shape[-1]
        flops = conv_flops(predictor.architecture, (1, 1, side, side))
        figures[name] = network_figures(predictor, flops, side, batches, repeats, result[ceiling])
        if name == "network_default_float16":
            with cudnn_autotune(False):
                figures[f"{name}_autotune_off"] = network_figures(
                    predictor, flops, side, batches, repeats, result[ceiling]
                )
    paper_flops = conv_flops(UNetConfig.paper(), (1, 1, 572, 572))
    paper = Predictor(UNet(UNetConfig.paper()), PreprocessConfig(), InstanceConfig(), InferenceOptions.float32(device))
    figures["network_paper_572"] = network_figures(
        paper, paper_flops, 572, [1] if quick else [1, 2], 2, result[float32_ceiling(device)]
    )
    if device.type == "cuda":
        float16 = replace(InferenceOptions.float32(device), half_precision=True)
        paper_fp16 = Predictor(UNet(UNetConfig.paper()), PreprocessConfig(), InstanceConfig(), float16)
        figures["network_paper_572_float16"] = network_figures(
            paper_fp16, paper_flops, 572, [1, 16], repeats, result["matmul_gflops_float16"]
        )
        # network_figures copies each batch in and the probabilities out; the published figure is the network
        # alone, so it is also measured on a batch already in GPU memory.
        figures["network_paper_572_float16"]["resident_batch_16_images_per_s"] = resident_images_per_s(
            paper_fp16, 16, 572, repeats
        )
        figures["reference"] = REFERENCE_A100
    return figures


def resident_images_per_s(predictor: Predictor, batch: int, side: int, repeats: int) -> float:
    """Images per second of the predictor's network alone on a batch already on its device, in its precision:
    no copies and no softmax."""
    runner = predictor.runner
    dtype = torch.float16 if runner.precision == "float16" else torch.float32
    x = torch.randn(batch, 1, side, side, device=runner.device, dtype=dtype)
    x = x.contiguous(memory_format=runner.memory_format)
    with torch.inference_mode():
        return batch / best_of(lambda: synchronized(runner.device, runner.model(x)), repeats)

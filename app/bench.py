"""`bench`: measure the network and the service on this machine, each figure beside its reference from the same run.

Sections: a large matmul (the ceiling; fp32, and bfloat16 on CPUs that compute it natively or float16 on CUDA); the
network alone (the default model with PyTorch in fp32 and, where available, bfloat16, compiled, ONNX Runtime, or float16
on CUDA; the paper's 572 U-Net with PyTorch, and on CUDA in float16 at batch 16 beside NVIDIA's published A100 figure)
at batch 1 and its best batch; the instance step, the reference beside the torch step on the device; the service end to
end through a real uvicorn on 127.0.0.1 (latency per format and mode, and where the time goes); throughput at several
concurrencies (the load from app.loadgen), as shipped and with micro-batches of 8 forced; server memory (and the GPU's)
after 50 and 500 requests. Prints a table and writes the same figures as JSON.

A soak (`--soak MINUTES`, alone): the service under mixed good and bad requests at `--soak-concurrency` (16) for
that long, counting answers by status, sampling its memory, and timing /health beside the load.

Example:  bench --out bench.json            (about 3 minutes on 2 CPU cores; --quick for about 2)
          bench --device cuda --out bench-gpu.json    (the network alone on the GPU, the service with CELLSEG_DEVICE)
          bench --soak 20 --out soak.json   (20 minutes of mixed load; the figures say whether it held)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from torch import nn

from app.cli import add_model_arguments, model_folder, tune_malloc
from app.loadgen import post_from_processes, post_many
from app.localserver import LocalServer, running_server
from app.ml import rle
from app.ml.imageio import read_image
from app.ml.options import Mode
from app.ml.postprocess import InstanceConfig, Instances
from app.ml.serving.gpu_instances import maps_to_instances_torch
from app.ml.serving.onnx_backend import onnxruntime_available
from app.ml.serving.predictor import Predictor
from app.ml.serving.runner import native_bfloat16, pick_device
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNet, UNetConfig

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared/data/sartorius/test/7ae19de7bc2a.png"


# ---------------------------------------------------------------- measuring


def best_of(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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


def synchronized(device: torch.device, result: object) -> object:
    """`result` once `device` has finished computing it (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


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
    run: Callable[[np.ndarray], object], flops: float, side: int, batches: list[int], repeats: int, ceiling: float
) -> dict:
    """ms per image and GFLOP/s at each batch size of `run` on (N, 1, side, side) inputs."""
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


# ---------------------------------------------------------------- the service


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def latency_figures(server: LocalServer, image: bytes, requests: int) -> dict:
    """p50/p95/p99 at concurrency 1 per format and mode, and the server's stage split (json only)."""
    figures = {}
    for mode in ("resize", "tile"):
        for fmt in ("json", "png", "overlay"):
            count = requests if mode == "resize" else max(3, requests // 3)
            records, _ = asyncio.run(post_many(server.url, image, count, 1, {"format": fmt, "mode": mode}))
            seconds = [r["seconds"] for r in records if r["status"] == 200]
            entry = {
                "requests": count,
                "errors": count - len(seconds),
                "p50_ms": percentile(seconds, 50) * 1000,
                "p95_ms": percentile(seconds, 95) * 1000,
                "p99_ms": percentile(seconds, 99) * 1000,
            }
            if fmt == "json":
                entry["stages_ms"] = stage_split(records)
            figures[f"{fmt}/{mode}"] = entry
    return figures


def stage_split(records: list[dict]) -> dict[str, float]:
    """Median server time per stage, and what is left of the round trip: HTTP, parsing, threads."""
    timed = [r for r in records if "timings" in r]
    split = {k.removesuffix("_ms"): statistics.median(r["timings"][k] for r in timed) for k in timed[0]["timings"]}
    split["http_and_rest"] = statistics.median(r["seconds"] * 1000 - sum(r["timings"].values()) for r in timed)
    return split


def throughput_figures(
    server: LocalServer, image: bytes, concurrencies: list[int], per_level: int, gpu: int | None = None
) -> dict:
    """Images per second and p50 at each concurrency; with `gpu` (a CUDA index), also the GPU's busy share meanwhile."""
    figures = {}
    for concurrency in concurrencies:
        count = max(per_level, concurrency)
        with GpuBusy(gpu) as busy:
            records, wall = post_from_processes(server.url, image, count, concurrency, {})
        ok = sum(r["status"] == 200 for r in records)
        figures[concurrency] = {
            "requests": count,
            "errors": count - ok,
            "images_per_s": ok / wall,
            "p50_ms": percentile([r["seconds"] for r in records], 50) * 1000,
        }
        if busy.share is not None:
            figures[concurrency]["gpu_busy_share"] = busy.share
        print(f"  concurrency {concurrency}: {figures[concurrency]['images_per_s']:.2f} images/s", flush=True)
    return figures


class GpuBusy:
    """While inside, samples a CUDA GPU's utilization (the share of time a kernel ran) ten times a second with
    nvidia-smi; `share` is their mean afterwards, or None without a GPU index or without nvidia-smi."""

    def __init__(self, index: int | None) -> None:
        self.index, self.share = index, None
        self._samples: list[float] = []
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        if self.index is not None and shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            self._process = subprocess.Popen([*query, "-i", str(self.index), "-lms", "100"], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self._samples.append(float(line) / 100)

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._reader.join(timeout=2)
            self.share = statistics.fmean(self._samples) if self._samples else None


def memory_figures(server: LocalServer, image: bytes, total: int, gpu: int | None = None) -> dict:
    """Server resident memory after 50 requests and after `total`, at concurrency 4; with `gpu` (a CUDA index),
    the GPU's memory in use as well."""
    asyncio.run(post_many(server.url, image, 50, 4, {}))
    after_50, gpu_after_50 = server.memory_kib(), gpu_memory_mib(gpu)
    asyncio.run(post_many(server.url, image, total - 50, 4, {}))
    after_total, gpu_after_total = server.memory_kib(), gpu_memory_mib(gpu)
    figures = {
        "rss_mib_after_50": after_50["VmRSS"] / 1024,
        f"rss_mib_after_{total}": after_total["VmRSS"] / 1024,
        "peak_rss_mib": after_total["VmHWM"] / 1024,
        "growth": after_total["VmRSS"] / after_50["VmRSS"] - 1,
    }
    if gpu_after_50 and gpu_after_total:
        figures |= {"gpu_mib_after_50": gpu_after_50, f"gpu_mib_after_{total}": gpu_after_total,
                    "gpu_growth": gpu_after_total / gpu_after_50 - 1}  # fmt: skip
    return figures


def gpu_memory_mib(index: int | None) -> float | None:
    """Memory in use on a CUDA GPU, every process's together, as nvidia-smi reports it; None without a GPU index
    or without nvidia-smi."""
    if index is None or not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)]
    output = subprocess.run(query, capture_output=True, text=True, check=False).stdout
    with contextlib.suppress(ValueError):
        return float(output.strip())
    return None


def rle_figures() -> dict:
    grid = np.random.default_rng(0).permutation(np.arange(1, 401)).reshape(20, 20)
    labels = grid.repeat(26, axis=0).repeat(36, axis=1)[:, :704].astype(np.int32)
    return {"encode_400_cells_520x704_ms": best_of(lambda: rle.encode_labels(labels), 20) * 1000}


def soak_requests(image: bytes) -> list[tuple[str, dict, bytes]]:
    """The soak's mix, in turn: (name, query, file). Half are good images; the rest each earn a 4xx."""
    header_only = image[:33] + b"\x00" * 16  # a PNG cut after its header: truncated
    return [
        ("json", {}, image), ("png", {"format": "png"}, image), ("tile", {"mode": "tile"}, image),
        ("overlay", {"format": "overlay"}, image), ("junk", {}, b"this is not an image"),
        ("truncated", {}, header_only), ("bad option", {"seed_threshold": "7"}, image),
        ("empty", {}, b""),
    ]  # fmt: skip


async def soak(url: str, image: bytes, seconds: float, concurrency: int, memory: Callable[[], int]) -> dict:
    """Mixed requests from `concurrency` clients for `seconds`; /health timed every half second; memory sampled
    every 10 s. Returns the counts by status, the memory samples (MiB) and /health's latency."""
    mix, statuses, health, samples = soak_requests(image), {}, [], []
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, index: int) -> None:
        while time.monotonic() < deadline:
            name, params, data = mix[index % len(mix)]
            index += concurrency
            try:
                answer = await http.post("/segment", params=params, files={"file": (f"{name}.png", data)})
                key = str(answer.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1

    async def watch(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await http.get("/health")
            health.append(time.perf_counter() - started)
            if len(health) % 20 == 1:
                samples.append(memory() / 1024)
                print(f"soak: {len(health) // 2} s, {sum(statuses.values())} answers {statuses}, "
                      f"{samples[-1]:.0f} MiB", flush=True)  # fmt: skip
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http,
        httpx.AsyncClient(base_url=url, timeout=10) as probe,
    ):
        await asyncio.gather(watch(probe), *(client(http, i) for i in range(concurrency)))
    settled = samples[len(samples) // 4 :] or samples  # after the first quarter: caches and arenas warmed up
    return {
        "seconds": seconds, "concurrency": concurrency, "answers": statuses,
        "server_errors": sum(n for key, n in statuses.items() if not key.isdigit() or key.startswith("5")),
        "memory_mib": samples, "memory_growth_after_warm_up": settled[-1] / settled[0] - 1,
        "health_p50_ms": percentile(health, 50) * 1000, "health_p99_ms": percentile(health, 99) * 1000,
    }  # fmt: skip


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Every section in turn, each into `result` as it is measured (so a run stopped early keeps what it had)."""
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    device = pick_device(args.device)
    folder = model_folder(args)
    image = Path(args.image).read_bytes()
    result["machine"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device_name(device),
        **cuda_settings(device),
    }
    result["model"] = folder.name  # a model's version is its folder's name
    print("matmul ceiling ...", flush=True)
    result.update(ceilings(device))
    print("network alone ...", flush=True)
    result.update(network_section(folder, device, result, args.quick))
    print("instance step ...", flush=True)
    result["instance_step"] = instance_step_section(folder, device, Path(args.image), 3 if args.quick else 5)
    result["rle"] = rle_figures()
    settings = {"model_store": str(folder.parent), "model_version": folder.name, "log_level": "WARNING",
                "device": str(device), "backend": args.backend, "half_precision": str(args.half_precision).lower(),
                "compile": str(args.compile).lower(), "tta": str(args.tta), "workers": str(args.workers),
                "steps_on_device": args.steps_on_device}  # fmt: skip
    print("service end to end ...", flush=True)
    quick = args.quick
    gpu = (device.index or 0) if device.type == "cuda" else None
    # A GPU serves hundreds of images a second: a level needs that many requests to reach its steady state.
    per_level = (128 if quick else 512) if gpu is not None else (16 if quick else 32)
    # The service as shipped (max_batch auto: 1 on CPU, 8 on CUDA), then with micro-batches of up to 8 forced on.
    with running_server(**settings) as server:
        ready = httpx.get(f"{server.url}/ready").json()
        result["service"] = {key: ready[key] for key in ("backend", "precision", "compiled")}
        result["service"]["workers"] = args.workers
        # Steady state first: the first series after the network section above ran up to 30 % slower (bfloat16).
        asyncio.run(post_many(server.url, image, 20, 1, {}))
        result["latency"] = latency_figures(server, image, 8 if quick else 20)
        result["throughput_default"] = throughput_figures(server, image, args.concurrency, per_level, gpu)
        result["memory"] = memory_figures(server, image, 150 if quick else 500, gpu)
    with running_server(**settings, max_batch="8") as server:
        result["throughput_batch_8"] = throughput_figures(server, image, args.concurrency, per_level, gpu)
    result["ratios"] = ratios(result)


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    folder = model_folder(args)
    settings = {"model_store": str(folder.parent), "model_version": folder.name, "log_level": "WARNING",
                "device": args.device, "backend": args.backend}  # fmt: skip
    with running_server(**settings) as server:
        resident = lambda: server.memory_kib()["VmRSS"]  # noqa: E731 - read at each sample
        figures = asyncio.run(soak(server.url, Path(args.image).read_bytes(), args.soak * 60, args.soak_concurrency,
                                   resident))  # fmt: skip
    return {"model": folder.name, **figures}


def cuda_settings(device: torch.device) -> dict[str, bool]:
    """How PyTorch computes on CUDA, which the figures depend on: TF32 for float32 convolutions and matmuls."""
    if device.type != "cuda":
        return {}
    return {"tf32_convolutions": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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
    load = functools.partial(Predictor.from_checkpoint, folder, device=str(device))
    if device.type == "cuda":
        batches = [1, 4, 16] if quick else [1, 2, 4, 8, 16]
        return {"network_default": (load(half_precision=False), float32_ceiling(device), batches),
                "network_default_float16": (load(half_precision=True), "matmul_gflops_float16", batches)}  # fmt: skip
    batches = [1, 2, 4] if quick else [1, 2, 4, 8]
    full = functools.partial(load, half_precision=False)
    variants = {"network_default": (full(), "matmul_gflops", batches),
                "network_default_compiled": (full(compile_network=True), "matmul_gflops", [1])}  # fmt: skip
    if native_bfloat16():
        variants["network_default_bfloat16"] = (load(half_precision=True), "matmul_gflops_bfloat16", batches)
        variants["network_default_bfloat16_compiled"] = (
            load(half_precision=True, compile_network=True),
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
        figures[name] = network_figures(predictor.run_network, flops, side, batches, repeats, result[ceiling])
        if name == "network_default_float16":
            with cudnn_autotune(False):
                figures[f"{name}_autotune_off"] = network_figures(
                    predictor.run_network, flops, side, batches, repeats, result[ceiling]
                )
    paper_flops = conv_flops(UNetConfig.paper(), (1, 1, 572, 572))
    paper = Predictor(UNet(UNetConfig.paper()), PreprocessConfig(), InstanceConfig(), device=device)
    figures["network_paper_572"] = network_figures(
        paper.run_network, paper_flops, 572, [1] if quick else [1, 2], 2, result[float32_ceiling(device)]
    )
    if device.type == "cuda":
        paper_fp16 = Predictor(
            UNet(UNetConfig.paper()), PreprocessConfig(), InstanceConfig(), device, half_precision=True
        )
        figures["network_paper_572_float16"] = network_figures(
            paper_fp16.run_network, paper_flops, 572, [1, 16], repeats, result["matmul_gflops_float16"]
        )
        # run_network copies each batch in and the probabilities out, as the service does; the published figure
        # is the network alone, so it is also measured on a batch already in GPU memory.
        figures["network_paper_572_float16"]["resident_batch_16_images_per_s"] = resident_images_per_s(
            paper_fp16, 16, 572, repeats
        )
        figures["reference"] = REFERENCE_A100
    return figures


def resident_images_per_s(predictor: Predictor, batch: int, side: int, repeats: int) -> float:
    """Images per second of the predictor's network alone on a batch already on its device, in its precision:
    no copies and no softmax."""
    runner = predictor.runner
    dtype = torch.float16 if runner.half else torch.float32
    x = torch.randn(batch, 1, side, side, device=runner.device, dtype=dtype)
    x = x.contiguous(memory_format=runner.memory_format)
    with torch.inference_mode():
        return batch / best_of(lambda: synchronized(runner.device, runner.model(x)), repeats)


def instance_step_section(folder: Path, device: torch.device, image: Path, repeats: int) -> dict[str, Any]:
    """The instance step on the default model's maps of `image`, as the service runs it (the cell type read
    first, then that type's rules): the reference, numpy and scikit-image on the CPU after the maps are copied
    there (CELLSEG_STEPS_ON_DEVICE resize, or none), beside the torch step where the maps are (all); and how many
    tensor operations the torch step dispatches, each of them at least one kernel launch on a GPU."""
    predictor = Predictor.from_checkpoint(folder, device=str(device), half_precision=False, steps_on_device="all")
    prepared = predictor.prepare(read_image(image))
    maps = predictor.maps(prepared, predictor.run_tiles(prepared.tiles))
    rules = predictor.instances

    def on_cpu() -> Instances:
        return rules.find(maps.cpu().numpy(), prepared.contrast)

    def on_device() -> Instances:
        return rules.find(maps, prepared.contrast, step=maps_to_instances_torch)

    with torch.inference_mode():
        return {
            "reference_on_cpu_ms": best_of(on_cpu, repeats) * 1000,
            "torch_on_device_ms": best_of(on_device, repeats) * 1000,
            "torch_tensor_operations": tensor_operations(on_device),
            "cells": len(on_cpu().areas),
        }


def tensor_operations(run: Callable[[], object]) -> int:
    """How many ATen operations `run` dispatches from Python (views included; the operations they call inside
    not counted again)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return sum(1 for event in profiler.events() if _is_aten(event) and not _is_aten(event.cpu_parent))


def _is_aten(event: Any) -> bool:
    return event is not None and event.name.startswith("aten::")


# NVIDIA's published inference figure for the paper's U-Net at 572x572 (the reference).
REFERENCE_A100 = {"network": "U-Net 572x572", "gpu": "A100", "precision": "float16", "batch": 16,
                  "images_per_s": 424}  # fmt: skip


# The "network alone" figures that match what the service runs, by (backend, precision, compiled).
NETWORK_OF_SERVICE = {
    ("torch", "float32", False): "network_default",
    ("torch", "float32", True): "network_default_compiled",
    ("torch", "bfloat16", False): "network_default_bfloat16",
    ("torch", "bfloat16", True): "network_default_bfloat16_compiled",
    ("torch", "float16", False): "network_default_float16",
    ("onnxruntime", "float32", False): "network_default_onnxruntime",
}


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The figures the issue's goals are stated in, each from this run's own references: the network alone is
    measured as the service runs it (backend, precision, compiled), against the matmul ceiling in that precision."""
    service = result["service"]
    network = result[NETWORK_OF_SERVICE[service["backend"], service["precision"], service["compiled"]]]
    best = network["batches"][network["best_batch"]]
    e2e = result["latency"]["json/resize"]
    stages = e2e["stages_ms"]
    on = result["throughput_default"]
    levels = sorted({16 if 16 in on else max(on), max(on)})
    memory = result["memory"]
    gpu_memory = {"gpu_memory_growth_50_to_last": memory["gpu_growth"]} if "gpu_growth" in memory else {}
    return {
        "e2e_p50_over_network_batch1": e2e["p50_ms"] / network["batches"][1]["ms_per_image"],
        "non_network_share_of_e2e": 1 - stages["network"] / e2e["p50_ms"],
        **{f"throughput_c{c}_over_best_network": on[c]["images_per_s"] / best["images_per_s"] for c in levels},
        **{f"gpu_busy_share_c{c}": on[c]["gpu_busy_share"] for c in levels if "gpu_busy_share" in on[c]},
        "network_best_of_matmul_ceiling": best["of_matmul_ceiling"],
        "memory_growth_50_to_last": memory["growth"],
        **gpu_memory,
        "errors": sum(v["errors"] for k in ("throughput_default", "throughput_batch_8")
                      for v in result[k].values()),
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, torch {result['machine']['torch']}, {result['machine']['device']}, "
        f"{result['machine']['threads']} threads, "
        f"service: {result['service']['workers']} worker(s), {result['service']['backend']} in "
        f"{result['service']['precision']}" + (", compiled" if result["service"]["compiled"] else ""),
        f"matmul ceiling                      {result['matmul_gflops']:8.1f} GFLOP/s",
    ]
    for precision in ("tf32", "bfloat16", "float16"):
        if f"matmul_gflops_{precision}" in result:
            lines.append(f"matmul ceiling, {precision:<19} {result[f'matmul_gflops_{precision}']:8.1f} GFLOP/s")
    for name in (n for n in result if n.startswith("network_")):
        section = result[name]
        for batch, row in section["batches"].items():
            lines.append(
                f"{name} {section['input']}px batch {batch:<3} {row['ms_per_image']:8.1f} ms/img "
                f"{row['gflops']:7.1f} GFLOP/s ({row['of_matmul_ceiling']:.0%} of matmul)"
            )
    if "reference" in result:
        ref = result["reference"]
        here = result["network_paper_572_float16"]["resident_batch_16_images_per_s"]
        lines.append(
            f"published: {ref['network']} on {ref['gpu']}, {ref['precision']}, batch {ref['batch']}: "
            f"{ref['images_per_s']} img/s; here on {result['machine']['device']}: {here:.1f} img/s (batch in GPU "
            "memory; network_paper_572_float16 above with the copies)"
        )
    lines.append(f"rle encode 400 cells                {result['rle']['encode_400_cells_520x704_ms']:8.2f} ms")
    step = result["instance_step"]
    lines.append(
        f"instance step, {step['cells']} cells: reference on the CPU {step['reference_on_cpu_ms']:.1f} ms, torch on "
        f"{result['machine']['device']} {step['torch_on_device_ms']:.1f} ms ({step['torch_tensor_operations']} "
        "tensor operations)"
    )
    for key, row in result["latency"].items():
        lines.append(
            f"e2e c=1 {key:<16} p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms"
        )
        if "stages_ms" in row:
            lines.append("        stages ms: " + ", ".join(f"{k} {v:.1f}" for k, v in row["stages_ms"].items()))
    for name in ("throughput_default", "throughput_batch_8"):
        for concurrency, row in result[name].items():
            busy = f"  GPU busy {row['gpu_busy_share']:.0%}" if "gpu_busy_share" in row else ""
            lines.append(
                f"{name:<24} c={concurrency:<3} {row['images_per_s']:6.2f} img/s  p50 {row['p50_ms']:8.1f} ms"
                f"  errors {row['errors']}{busy}"
            )
    memory = result["memory"]
    lines.append(
        "memory MiB: " + ", ".join(f"{k} {v:.1f}" if "mib" in k else f"{k} {v:+.2%}" for k, v in memory.items())
    )
    lines.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_arguments(parser)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="a real 520x704 image to post")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="levels to measure")
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (about 3 minutes)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (CELLSEG_WORKERS)")
    parser.add_argument("--out", default="bench.json", help="where to write the figures as JSON")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="only the soak, for this long")
    parser.add_argument("--soak-concurrency", type=int, default=16, help="clients in the soak")
    args = parser.parse_args(argv)
    tune_malloc()  # the network alone is measured with the allocator settings the service runs with
    signal.signal(signal.SIGTERM, stop_on_terminate)
    result: dict[str, Any] = {}
    try:
        if args.soak:
            result.update(run_soak(args))
            print(json.dumps({k: v for k, v in result.items() if k != "memory_mib"}, indent=2))
        else:
            run(args, result)
            print(table(result))
    except BaseException:
        result["stopped_early"] = True
        raise
    finally:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        stopped = " (stopped early: the sections measured so far)" if result.get("stopped_early") else ""
        print(f"wrote {args.out}{stopped}")


def stop_on_terminate(signum: int, frame: object) -> None:
    """`timeout` and process managers stop bench with SIGTERM: leave through the finally blocks, so the services
    it started and its load clients stop with it and the figures so far are written."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()

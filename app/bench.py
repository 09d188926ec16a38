"""`bench`: measure the network and the service on this machine, each figure beside its reference from the same run.

Sections: a large matmul (the ceiling; fp32, and bfloat16 on CPUs with AMX); the network alone (the default model
with PyTorch in fp32 and, where available, bfloat16 and ONNX Runtime; the paper's 572 U-Net with PyTorch) at batch
1 and its best batch; the service end to end through a real uvicorn on 127.0.0.1 (latency per format and mode, and
where the time goes); throughput at several concurrencies, as shipped and with micro-batches of 8 forced; server
memory after 50 and 500 requests. Prints a table and writes the same figures as JSON.

Example:  bench --out bench.json            (about 10 minutes on 2 CPU cores; --quick for about 3)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from torch import nn

from app.cli import add_model_arguments, model_folder, tune_malloc
from app.localserver import LocalServer, running_server
from app.ml import rle
from app.ml.onnx_backend import onnxruntime_available
from app.ml.postprocess import InstanceConfig
from app.ml.predictor import Mode, Predictor, native_bfloat16
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


def matmul_gflops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of a size x size matmul in `dtype`: what these cores can do at best."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_of(lambda: a @ b, repeats) / 1e9


def conv_flops(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Floating-point operations of one forward pass, counting convolutions (2 per multiply-add)."""
    total = 0.0

    def count(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, nn.ConvTranspose2d):
            total += 2.0 * inputs[0].numel() * module.out_channels * k
        else:
            total += 2.0 * output.numel() * module.in_channels * k // module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    with torch.inference_mode():
        model(torch.zeros(input_shape))
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


async def post_many(url: str, image: bytes, count: int, concurrency: int, params: dict) -> tuple[list[dict], float]:
    """`count` POST /segment with at most `concurrency` in flight -> per-request records and wall seconds."""
    limit = asyncio.Semaphore(concurrency)
    records: list[dict] = []

    async def one(http: httpx.AsyncClient) -> None:
        async with limit:
            started = time.perf_counter()
            response = await http.post("/segment", params=params, files={"file": ("bench.png", image)})
            record = {"status": response.status_code, "seconds": time.perf_counter() - started}
            if response.status_code == 200 and params.get("format", "json") == "json":
                record["timings"] = response.json()["timings"]
            records.append(record)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http) for _ in range(count)))
        return records, time.perf_counter() - started


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


def throughput_figures(server: LocalServer, image: bytes, concurrencies: list[int], per_level: int) -> dict:
    figures = {}
    for concurrency in concurrencies:
        count = max(per_level, concurrency)
        records, wall = asyncio.run(post_many(server.url, image, count, concurrency, {}))
        ok = sum(r["status"] == 200 for r in records)
        figures[concurrency] = {
            "requests": count,
            "errors": count - ok,
            "images_per_s": ok / wall,
            "p50_ms": percentile([r["seconds"] for r in records], 50) * 1000,
        }
    return figures


def memory_figures(server: LocalServer, image: bytes, total: int) -> dict:
    """Server resident memory after 50 requests and after `total`, at concurrency 4."""
    asyncio.run(post_many(server.url, image, 50, 4, {}))
    after_50 = server.memory_kib()
    asyncio.run(post_many(server.url, image, total - 50, 4, {}))
    after_total = server.memory_kib()
    return {
        "rss_mib_after_50": after_50["VmRSS"] / 1024,
        f"rss_mib_after_{total}": after_total["VmRSS"] / 1024,
        "peak_rss_mib": after_total["VmHWM"] / 1024,
        "growth": after_total["VmRSS"] / after_50["VmRSS"] - 1,
    }


def rle_figures() -> dict:
    grid = np.random.default_rng(0).permutation(np.arange(1, 401)).reshape(20, 20)
    labels = grid.repeat(26, axis=0).repeat(36, axis=1)[:, :704].astype(np.int32)
    return {"encode_400_cells_520x704_ms": best_of(lambda: rle.encode_labels(labels), 20) * 1000}


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    folder = model_folder(args)
    predictor = Predictor.from_checkpoint(folder, device="cpu", half=False)
    image = Path(args.image).read_bytes()
    side = predictor.prepare(np.zeros((520, 704), np.float32), Mode.RESIZE).tiles.shape[-1]
    quick = args.quick
    result: dict[str, Any] = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": predictor.version,
    }
    print("matmul ceiling ...", flush=True)
    result["matmul_gflops"] = matmul_gflops()
    if native_bfloat16():
        result["matmul_gflops_bfloat16"] = matmul_gflops(dtype=torch.bfloat16)
    print("network alone ...", flush=True)
    # Each variant through Predictor.run_network, the call the service's micro-batcher makes.
    batches = [1, 2, 4] if quick else [1, 2, 4, 8]
    repeats, ceiling = 3 if quick else 5, result["matmul_gflops"]
    flops = conv_flops(predictor.model, (1, 1, side, side))
    # name: (predictor, its matmul ceiling, batch sizes). Compiled networks only at batch 1, the shape the service
    # compiles while warming up on the CPU; any other batch would run uncompiled.
    compiled = Predictor.from_checkpoint(folder, device="cpu", half=False, compile_network=True)
    variants = {"network_default": (predictor, ceiling, batches), "network_default_compiled": (compiled, ceiling, [1])}
    if native_bfloat16():
        bf16 = Predictor.from_checkpoint(folder, device="cpu", half=True, backend="torch")
        bf16_compiled = Predictor.from_checkpoint(folder, device="cpu", half=True, compile_network=True)
        variants["network_default_bfloat16"] = (bf16, result["matmul_gflops_bfloat16"], batches)
        variants["network_default_bfloat16_compiled"] = (bf16_compiled, result["matmul_gflops_bfloat16"], [1])
    if onnxruntime_available():
        onnx = Predictor.from_checkpoint(folder, backend="onnxruntime")
        variants["network_default_onnxruntime"] = (onnx, ceiling, batches)
    for name, (variant, its_ceiling, its_batches) in variants.items():
        variant.warm_up()  # compiles the network for the input shapes the service uses
        result[name] = network_figures(variant.run_network, flops, side, its_batches, repeats, its_ceiling)
    paper = Predictor(UNet(UNetConfig.paper()), PreprocessConfig(), InstanceConfig())
    result["network_paper_572"] = network_figures(
        paper.run_network, conv_flops(paper.model, (1, 1, 572, 572)), 572, [1] if quick else [1, 2], 2, ceiling
    )
    result["rle"] = rle_figures()
    settings = {"model_store": str(folder.parent), "model_version": folder.name, "log_level": "WARNING",
                "backend": args.backend, "half_precision": str(not args.full_precision).lower(),
                "compile": str(not args.no_compile).lower()}  # fmt: skip
    print("service end to end ...", flush=True)
    # The service as shipped (max_batch auto: 1 on CPU, 8 on CUDA), then with micro-batches of up to 8 forced on.
    with running_server(**settings) as server:
        ready = httpx.get(f"{server.url}/ready").json()
        result["service"] = {key: ready[key] for key in ("backend", "precision", "compiled")}
        # Steady state first: the first series after the network section above ran up to 30 % slower (bfloat16).
        asyncio.run(post_many(server.url, image, 20, 1, {}))
        result["latency"] = latency_figures(server, image, 8 if quick else 20)
        result["throughput_default"] = throughput_figures(server, image, args.concurrency, 16 if quick else 32)
        result["memory"] = memory_figures(server, image, 150 if quick else 500)
    with running_server(**settings, max_batch="8") as server:
        result["throughput_batch_8"] = throughput_figures(server, image, args.concurrency, 16 if quick else 32)
    result["ratios"] = ratios(result)
    return result


# The "network alone" figures that match what the service runs, by (backend, precision, compiled).
NETWORK_OF_SERVICE = {
    ("torch", "float32", False): "network_default",
    ("torch", "float32", True): "network_default_compiled",
    ("torch", "bfloat16", False): "network_default_bfloat16",
    ("torch", "bfloat16", True): "network_default_bfloat16_compiled",
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
    concurrency = 16 if 16 in on else max(on)
    return {
        "e2e_p50_over_network_batch1": e2e["p50_ms"] / network["batches"][1]["ms_per_image"],
        "non_network_share_of_e2e": 1 - stages["network"] / e2e["p50_ms"],
        f"throughput_c{concurrency}_over_best_network": on[concurrency]["images_per_s"] / best["images_per_s"],
        "network_best_of_matmul_ceiling": best["of_matmul_ceiling"],
        "memory_growth_50_to_last": result["memory"]["growth"],
        "errors": sum(v["errors"] for k in ("throughput_default", "throughput_batch_8")
                      for v in result[k].values()),
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, torch {result['machine']['torch']}, {result['machine']['threads']} threads, "
        f"service: {result['service']['backend']} in {result['service']['precision']}"
        + (", compiled" if result["service"]["compiled"] else ""),
        f"matmul ceiling                      {result['matmul_gflops']:8.1f} GFLOP/s",
    ]
    if "matmul_gflops_bfloat16" in result:
        lines.append(f"matmul ceiling, bfloat16            {result['matmul_gflops_bfloat16']:8.1f} GFLOP/s")
    for name in ("network_default", "network_default_compiled", "network_default_bfloat16",
                 "network_default_bfloat16_compiled", "network_default_onnxruntime", "network_paper_572"):  # fmt: skip
        section = result.get(name, {"batches": {}})
        for batch, row in section["batches"].items():
            lines.append(
                f"{name} {section['input']}px batch {batch:<3} {row['ms_per_image']:8.1f} ms/img "
                f"{row['gflops']:7.1f} GFLOP/s ({row['of_matmul_ceiling']:.0%} of matmul)"
            )
    lines.append(f"rle encode 400 cells                {result['rle']['encode_400_cells_520x704_ms']:8.2f} ms")
    for key, row in result["latency"].items():
        lines.append(
            f"e2e c=1 {key:<16} p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms"
        )
        if "stages_ms" in row:
            lines.append("        stages ms: " + ", ".join(f"{k} {v:.1f}" for k, v in row["stages_ms"].items()))
    for name in ("throughput_default", "throughput_batch_8"):
        for concurrency, row in result[name].items():
            lines.append(
                f"{name:<24} c={concurrency:<3} {row['images_per_s']:6.2f} img/s  p50 {row['p50_ms']:8.1f} ms"
                f"  errors {row['errors']}"
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
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                        help="the service's backend (CELLSEG_BACKEND)")  # fmt: skip
    parser.add_argument("--full-precision", action="store_true",
                        help="the service in float32 (CELLSEG_HALF_PRECISION=false)")  # fmt: skip
    parser.add_argument(
        "--no-compile", action="store_true", help="the service without torch.compile (CELLSEG_COMPILE=false)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: default)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (about 3 minutes)")
    parser.add_argument("--out", default="bench.json", help="where to write the figures as JSON")
    args = parser.parse_args(argv)
    tune_malloc()  # the network alone is measured with the allocator settings the service runs with
    result = run(args)
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`bench`: measure the network and the service on this machine, each figure beside its reference from the same run.

Sections: a large matmul (the ceiling; fp32, and bfloat16 on CPUs that compute it natively or float16 on CUDA); the
network alone (the default model with PyTorch in fp32 and, where available, bfloat16, compiled, ONNX Runtime, or float16
on CUDA; the paper's 572 U-Net with PyTorch, and on CUDA in float16 at batch 16 beside NVIDIA's published A100 figure)
at batch 1 and its best batch; the instance step, the reference beside the torch step on the device; the service end to
end through a real uvicorn on 127.0.0.1 (latency per format and mode, and where the time goes); throughput at several
concurrencies (the load from app.bench.loadgen), as shipped and with micro-batches of 8 forced; server memory (and the
GPU's) after 50 and 500 requests. Prints a table and writes the same figures as JSON.

A soak (`--soak MINUTES`, alone): the service under mixed good and bad requests at `--soak-concurrency` (16) for
that long, counting answers by status, sampling its memory, and timing /health beside the load.

Example:  bench --out bench.json            (--quick: fewer requests and repeats; docs/performance.md has run times)
          bench --device cuda --out bench-gpu.json    (the network alone on the GPU, the service with CELLSEG_DEVICE)
          bench --soak 20 --out soak.json   (20 minutes of mixed load; the figures say whether it held)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import torch

from app.bench.instance_step import instance_step_section, rle_figures
from app.bench.loadgen import post_many
from app.bench.localserver import running_server
from app.bench.network import ceilings, network_section
from app.bench.report import ratios, table
from app.bench.service import latency_figures, memory_figures, throughput_figures
from app.bench.soak import run_soak
from app.cli import add_model_arguments, inference_options, model_folder, tune_malloc
from app.ml.serving.runner import pick_device
from app.samples import path as sample_path

# A real competition test image shipped inside the package, so bench runs from any install and in the image.
DEFAULT_IMAGE = sample_path("cells.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="a real 520x704 image to post")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="levels to measure")
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats")
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
    settings = {
        "model_store": str(folder.parent),
        "model_version": folder.name,
        "log_level": "WARNING",
        **replace(inference_options(args), device=str(device)).as_settings(),
        "workers": str(args.workers),
    }
    print("service end to end ...", flush=True)
    quick = args.quick
    gpu = (device.index or 0) if device.type == "cuda" else None
    # A GPU serves many times the images a second of a CPU: a level needs that many more requests to reach its
    # steady state (docs/performance.md has the rates).
    per_level = (128 if quick else 512) if gpu is not None else (16 if quick else 32)
    # The service as shipped (max_batch auto: 1 on CPU, 8 on CUDA), then with micro-batches of up to 8 forced on.
    with running_server(**settings) as server:
        ready = httpx.get(f"{server.url}/ready").json()
        result["service"] = {key: ready[key] for key in ("backend", "precision", "compiled")}
        result["service"]["workers"] = args.workers
        # Steady state first: the first series after the network section ran slower (docs/performance.md).
        asyncio.run(post_many(server.url, image, 20, 1, {}))
        result["latency"] = latency_figures(server, image, 8 if quick else 20)
        result["throughput_default"] = throughput_figures(server, image, args.concurrency, per_level, gpu)
        result["memory"] = memory_figures(server, image, 150 if quick else 500, gpu)
    with running_server(**settings, max_batch="8") as server:
        result["throughput_batch_8"] = throughput_figures(server, image, args.concurrency, per_level, gpu)
    result["ratios"] = ratios(result)


def cuda_settings(device: torch.device) -> dict[str, bool]:
    """How PyTorch computes on CUDA, which the figures depend on: TF32 for float32 convolutions and matmuls."""
    if device.type != "cuda":
        return {}
    return {"tf32_convolutions": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()

"""Whether torch.compile pays for the default network on a GPU, before the service is given it there: the network
alone as the CUDA service runs it (float16, channels-last, the resize mode's input) eagerly, compiled by inductor,
and compiled with CUDA graphs (mode "reduce-overhead"), at batch 1 (concurrency 1) and 8 (the CUDA service's largest
micro-batch), each with the seconds its compilation took. The service compiles only on the CPU
(app/ml/serving/runner.py); this is the figure that would change that.

    source .device/env.sh && python3 scripts/gpu_compile_check.py --out $OUT/gpu-compile.json  (scripts/gpu-bench.sh)
    python scripts/gpu_compile_check.py --device cpu          (runs anywhere; the CPU service already compiles)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from app.bench.timing import best_of, synchronized
from app.ml.options import InferenceOptions, Mode
from app.ml.serving.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
MODES = {"eager": None, "inductor": "default", "inductor_cuda_graphs": "reduce-overhead"}


def figures(model: torch.nn.Module, inputs: dict[int, torch.Tensor], mode: str | None) -> dict:
    """ms per image at each batch, and the first call's seconds (the compilation, for a compiled mode)."""
    network = model if mode is None else torch.compile(model, mode=mode, dynamic=False)
    rows = {}
    for batch, x in inputs.items():
        started = time.perf_counter()
        synchronized(x.device, network(x))
        first_call_s = time.perf_counter() - started
        seconds = best_of(lambda x=x: synchronized(x.device, network(x)), 20)
        rows[batch] = {"ms_per_image": seconds * 1000 / batch, "first_call_s": first_call_s}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", type=Path, default=REPO / "model_store/sartorius-w16-v3")
    parser.add_argument("--out", type=Path, default=Path("gpu-compile.json"))
    args = parser.parse_args()
    predictor = Predictor.from_checkpoint(
        args.model, InferenceOptions(device=args.device, backend="torch", compile=False)
    )
    runner = predictor.runner
    side = predictor.prepare(np.zeros((520, 704), np.float32), Mode.RESIZE).tiles.shape[-1]
    dtype = torch.float16 if runner.precision == "float16" else torch.float32
    inputs = {
        batch: torch.randn(batch, 1, side, side, device=runner.device, dtype=dtype).contiguous(
            memory_format=runner.memory_format
        )
        for batch in (1, 8)
    }
    result = {
        "device": torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": runner.precision,
        "input": side,
    }
    with torch.inference_mode():
        for name, mode in MODES.items():
            try:
                result[name] = figures(runner.model, inputs, mode)
            except Exception as exc:  # a mode this machine cannot compile: say so, measure the others
                result[name] = {"error": str(exc).splitlines()[0][:300]}
            print(name, json.dumps(result[name]), flush=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""The steps after the network: the instance step as the service runs it, the reference on the CPU beside the
torch step on the device, and the RLE of a crowded image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.bench.timing import best_of
from app.ml import rle
from app.ml.imageio import read_image
from app.ml.options import InferenceOptions
from app.ml.postprocess import Instances
from app.ml.serving.gpu_instances import maps_to_instances_torch
from app.ml.serving.predictor import Predictor


def instance_step_section(folder: Path, device: torch.device, image: Path, repeats: int) -> dict[str, Any]:
    """The instance step on the default model's maps of `image`, as the service runs it (the cell type read
    first, then that type's rules): the reference, numpy and scikit-image on the CPU after the maps are copied
    there (CELLSEG_STEPS_ON_DEVICE resize, or none), beside the torch step where the maps are (all); and how many
    tensor operations the torch step dispatches, each of them at least one kernel launch on a GPU."""
    options = replace(InferenceOptions.float32(device), steps_on_device="all")
    predictor = Predictor.from_checkpoint(folder, options)
    prepared = predictor.prepare(read_image(image))
    maps = predictor.maps(prepared, predictor.run_tiles(prepared.tiles))
    rules = predictor.rules

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


def rle_figures() -> dict:
    grid = np.random.default_rng(0).permutation(np.arange(1, 401)).reshape(20, 20)
    labels = grid.repeat(26, axis=0).repeat(36, axis=1)[:, :704].astype(np.int32)
    return {"encode_400_cells_520x704_ms": best_of(lambda: rle.encode_labels(labels), 20) * 1000}

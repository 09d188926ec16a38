"""The steps around the network, in numpy or in torch, chosen once when the predictor is built
(CELLSEG_STEPS_ON_DEVICE): the predictor and the runner call the same methods of whichever they hold, and never
ask what kind of array they have.

NumpySteps is the reference: numpy, scipy and scikit-image on the CPU (the tiler, app.ml.transforms,
app.ml.postprocess). TorchSteps runs the same steps in torch on the network's device (torch_steps), so the image
stays there from upload to maps; with `instances_there` the instance step too (gpu_instances), else the maps come
to the CPU for the reference's instance step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from app.ml.options import DeviceSteps, Mode
from app.ml.postprocess import Instances, instance_maps
from app.ml.rules import InstanceRules
from app.ml.serving import torch_steps
from app.ml.serving.gpu_instances import maps_to_instances_torch
from app.ml.serving.tiler import TileGrid, Tiler


class NumpySteps:
    """numpy arrays on the CPU: the reference."""

    def cut(self, tiler: Tiler, image: np.ndarray, mode: Mode | str) -> tuple[np.ndarray, TileGrid, Mode]:
        """(H, W) float image -> (N, 1, h, w) float32 normalized tiles, their grid, and the mode that ran."""
        return tiler.cut(image, mode)

    def maps(self, tiler: Tiler, outputs: np.ndarray, grid: TileGrid, shape: tuple[int, int]) -> np.ndarray:
        """(N, C, h, w) probabilities of one image's tiles -> (2, H, W) foreground and seed maps at its `shape`."""
        return tiler.stitch(instance_maps(outputs), grid, shape)

    def instances(self, rules: InstanceRules, maps: np.ndarray, contrast: float) -> Instances:
        return rules.find(maps, contrast)

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return array

    def from_numpy(self, array: np.ndarray) -> np.ndarray:
        return array

    # The network's side (the runner): tensors in and out of the network, and the views of test-time augmentation.

    def to_tensor(self, tiles: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(tiles)

    def from_tensor(self, probabilities: torch.Tensor) -> np.ndarray:
        return probabilities.cpu().numpy()

    def concatenate(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    def stack(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Along a new first axis; a single array becomes a view with that axis instead of a copy (the usual case
        on the CPU, where micro-batches hold one tile)."""
        return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)

    def split(self, array: np.ndarray, parts: int) -> Sequence[np.ndarray]:
        return np.split(array, parts)

    def mean(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.mean(arrays, axis=0)

    def contiguous(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def turned(self, array: np.ndarray, turns: int) -> np.ndarray:
        """`turns` quarter turns of the last two axes."""
        return np.rot90(array, turns, axes=(-2, -1))

    def flipped(self, array: np.ndarray) -> np.ndarray:
        """Left-right."""
        return array[..., ::-1]


class TorchSteps:
    """Tensors on `device`, the network's: torch_steps, and gpu_instances for the instance step where
    `instances_there`."""

    def __init__(self, device: torch.device, instances_there: bool) -> None:
        self.device, self.instances_there = device, instances_there

    def cut(self, tiler: Tiler, image: np.ndarray, mode: Mode | str) -> tuple[torch.Tensor, TileGrid, Mode]:
        with torch.inference_mode():
            return torch_steps.cut(tiler, image, mode, self.device)

    def maps(self, tiler: Tiler, outputs: torch.Tensor, grid: TileGrid, shape: tuple[int, int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch_steps.maps(outputs, grid, shape)

    def instances(self, rules: InstanceRules, maps: torch.Tensor, contrast: float) -> Instances:
        """Where the maps are, only the labels and per-cell figures coming back; or the reference on the CPU."""
        if self.instances_there:
            with torch.inference_mode():
                return rules.find(maps, contrast, step=maps_to_instances_torch)
        return rules.find(self.to_numpy(maps), contrast)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return array.cpu().numpy()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def to_tensor(self, tiles: torch.Tensor) -> torch.Tensor:
        return tiles

    def from_tensor(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities

    def concatenate(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays))

    def stack(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return arrays[0][None] if len(arrays) == 1 else torch.stack(list(arrays))

    def split(self, array: torch.Tensor, parts: int) -> Sequence[torch.Tensor]:
        return torch.chunk(array, parts)

    def mean(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(arrays)).mean(dim=0)

    def contiguous(self, array: torch.Tensor) -> torch.Tensor:
        return array.contiguous()

    def turned(self, array: torch.Tensor, turns: int) -> torch.Tensor:
        return torch.rot90(array, turns, dims=(-2, -1))

    def flipped(self, array: torch.Tensor) -> torch.Tensor:
        return torch.flip(array, dims=(-1,))


Steps = NumpySteps | TorchSteps


def steps_for(setting: DeviceSteps, device: torch.device) -> Steps:
    """The steps of a resolved setting (none, resize or all) on the network's `device`."""
    return NumpySteps() if setting is DeviceSteps.NONE else TorchSteps(device, setting is DeviceSteps.ALL)

"""Preprocessing shared by training and serving: normalization, resizing, and the model's PreprocessConfig."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from app.ml.strict import from_fields


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W) float -> (H, W) float32 with zero mean and unit std, so 8- and 16-bit images look alike."""
    image = np.asarray(image, dtype=np.float32)
    std = float(image.std())
    return (image - float(image.mean())) / max(std, 1e-6)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) or (C, H, W) float -> same rank at `size` (bilinear, antialiased when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return np.asarray(image, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    batch = tensor.reshape(1, -1, *tensor.shape[-2:])
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*image.shape[:-2], *size).numpy()


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) int -> (h, w) int by nearest neighbour on pixel centres (labels are never blended)."""
    rows = _nearest_index(labels.shape[0], size[0])
    cols = _nearest_index(labels.shape[1], size[1])
    return labels[rows[:, None], cols[None, :]]


def scaled_size(shape: tuple[int, int], scale: tuple[float, float]) -> tuple[int, int]:
    """The (H, W) an image of `shape` has after scaling rows and columns by `scale`."""
    return max(1, round(shape[0] * scale[0])), max(1, round(shape[1] * scale[1]))


def _nearest_index(src: int, dst: int) -> np.ndarray:
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64), src - 1)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model sees images; saved in model.json so serving does exactly what training validated.

    input_size: the side every image is resized to in "resize" mode (the paper's 572).
    pixel_scale: (rows, cols) factors the model was trained at, relative to the images' native pixels;
        "tile" mode rescales by them before tiling. (1, 1) is native resolution.
    tile_size, tile_margin: network input side and the context each tile sees beyond its centre in "tile" mode.
    """

    input_size: int = 572
    pixel_scale: tuple[float, float] = (1.0, 1.0)
    tile_size: int = 512
    tile_margin: int = 112

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        config = from_fields(cls, data, "preprocessing")
        return replace(config, pixel_scale=(float(config.pixel_scale[0]), float(config.pixel_scale[1])))

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "pixel_scale": list(self.pixel_scale),
            "tile_size": self.tile_size,
            "tile_margin": self.tile_margin,
        }

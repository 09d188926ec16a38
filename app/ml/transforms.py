"""Preprocessing shared by training and serving: normalization, resizing, and the paper's overlap-tile."""

from __future__ import annotations

import math
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
class TileGrid:
    """How an (H, W) image is cut into tiles whose centres (tile_out) cover it, each seeing `margin` more."""

    shape: tuple[int, int]
    tile_out: tuple[int, int]
    margin: int

    @property
    def counts(self) -> tuple[int, int]:
        return math.ceil(self.shape[0] / self.tile_out[0]), math.ceil(self.shape[1] / self.tile_out[1])

    @property
    def tile_in(self) -> tuple[int, int]:
        return self.tile_out[0] + 2 * self.margin, self.tile_out[1] + 2 * self.margin

    @property
    def num_tiles(self) -> int:
        return self.counts[0] * self.counts[1]


def extract_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(H, W) -> (N, h_in, w_in) float32 tiles; beyond the border the image is mirrored, as in the paper."""
    rows, cols = grid.counts
    pad_h = rows * grid.tile_out[0] - image.shape[0] + grid.margin
    pad_w = cols * grid.tile_out[1] - image.shape[1] + grid.margin
    padded = np.pad(image, ((grid.margin, pad_h), (grid.margin, pad_w)), mode="reflect")
    h_in, w_in = grid.tile_in
    tiles = [
        padded[r * grid.tile_out[0] : r * grid.tile_out[0] + h_in, c * grid.tile_out[1] : c * grid.tile_out[1] + w_in]
        for r in range(rows)
        for c in range(cols)
    ]
    return np.ascontiguousarray(np.stack(tiles), dtype=np.float32)


def stitch_tiles(outputs: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(N, C, h, w) network outputs -> (C, H, W): each tile's centre tile_out, placed and cropped to the image."""
    rows, cols = grid.counts
    out_h, out_w = grid.tile_out
    top = (outputs.shape[-2] - out_h) // 2
    left = (outputs.shape[-1] - out_w) // 2
    centres = outputs[:, :, top : top + out_h, left : left + out_w]
    channels = outputs.shape[1]
    mosaic = centres.reshape(rows, cols, channels, out_h, out_w).transpose(2, 0, 3, 1, 4)
    mosaic = mosaic.reshape(channels, rows * out_h, cols * out_w)
    return np.ascontiguousarray(mosaic[:, : grid.shape[0], : grid.shape[1]])


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

"""The steps around the network in torch, on the network's device: normalization, the resize to the working size
and back, the overlap-tile cut and stitch (on the tiler's own geometry), and the two maps the instance step reads.

On CUDA they keep the image on the GPU from upload to labels, so the CPU only decodes and encodes. They mirror
the tiler's numpy steps (app.ml.serving.tiler, app.ml.transforms) operation for operation; a test runs both on
CPU tensors and checks that they find the same cells.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from app.ml.options import Mode
from app.ml.serving.tiler import MOSAIC_ORDER, TileGrid, Tiler, joined, mirror_indices, tile_centres, tile_windows
from app.ml.unet import BACKGROUND, CENTRE, INTERIOR


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) float32 -> (..., h, w), bilinear and antialiased, as transforms.resize_image."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batch = image.reshape(1, -1, *image.shape[-2:])
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*image.shape[:-2], *size)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (population) standard deviation, as transforms.normalize."""
    std = image.std(correction=0).clamp_min(1e-6)
    return (image - image.mean()) / std


def extract_tiles(image: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(H, W) -> (N, h_in, w_in) float32 tiles where the image is, mirrored beyond the border: tiler.extract_tiles."""
    rows, cols = (torch.from_numpy(index).to(image.device) for index in mirror_indices(image.shape, grid))
    padded = image.index_select(0, rows).index_select(1, cols)
    return torch.stack([padded[window] for window in tile_windows(grid)]).float()


def stitch_tiles(outputs: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(N, C, h, w) network outputs -> (C, H, W) where they are: tiler.stitch_tiles."""
    return joined(tile_centres(outputs, grid).permute(MOSAIC_ORDER), grid).contiguous()


def cut(tiler: Tiler, image: np.ndarray, mode: Mode | str, device: torch.device) -> tuple[torch.Tensor, TileGrid, Mode]:
    """(H, W) float image -> (N, 1, h, w) float32 normalized tiles on `device`, their grid and the mode that ran:
    Tiler.cut, with only the image itself copied to the device."""
    mode, grid = tiler.layout(image.shape, mode)
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device, non_blocking=True)
    return extract_tiles(normalize(resize(pixels, grid.shape)), grid)[:, None], grid, mode


def instance_maps(probs: torch.Tensor) -> torch.Tensor:
    """(N, 3 or 4, h, w) probabilities -> (N, 2, h, w): the foreground and the seed map, as
    postprocess.instance_maps."""
    seed_channel = CENTRE if probs.shape[1] > CENTRE else INTERIOR
    return torch.stack((1.0 - probs[:, BACKGROUND], probs[:, seed_channel]), dim=1)


def maps(outputs: torch.Tensor, grid: TileGrid, shape: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) probabilities of one image's tiles -> (2, H, W) float32 maps at the image's `shape`, on their
    device: Predictor.maps."""
    return resize(stitch_tiles(instance_maps(outputs), grid), shape).contiguous()

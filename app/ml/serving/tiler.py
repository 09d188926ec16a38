"""The tiler: how an image becomes network inputs and the outputs become maps at the image's size again.

It owns the geometry (the working size of each mode, the tile grid) and the cutting and stitching. In resize mode
the padded network sees the whole resized image at once; in tile mode, and always for the paper's unpadded
network, the image is cut as in the paper's overlap-tile: each tile's centre is kept, and it saw `margin` pixels
of context beyond it (mirrored at the image's borders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from app.ml.options import Mode, parse_option
from app.ml.transforms import PreprocessConfig, normalize, resize_image, scaled_size
from app.ml.unet import UNetConfig

# Auto mode resizes an image whose pixels at the trained scale are between these multiples of the resize input's.
AUTO_RESIZE_RATIOS = (0.5, 2.0)


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


# Images, tiles and network outputs: numpy arrays on the CPU path, tensors on the network's device (torch_steps); the
# predictor's steps (app.ml.serving.steps) say which, once.
Array = np.ndarray | torch.Tensor

# Tile centres laid out as (rows, cols, C, h, w) are reordered to (C, rows, h, cols, w) to join into one image.
MOSAIC_ORDER = (2, 0, 3, 1, 4)


def mirror_indices(shape: tuple[int, ...], grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of an (H, W) image that make up its tiles' padded canvas: beyond the border the image
    is mirrored, as in the paper. An index map made by numpy's reflect padding, which (unlike torch's) works for
    pads of any size."""
    rows, cols = grid.counts
    pad_h = rows * grid.tile_out[0] - shape[0] + grid.margin
    pad_w = cols * grid.tile_out[1] - shape[1] + grid.margin
    row_index = np.pad(np.arange(shape[0]), (grid.margin, pad_h), mode="reflect")
    col_index = np.pad(np.arange(shape[1]), (grid.margin, pad_w), mode="reflect")
    return row_index, col_index


def tile_windows(grid: TileGrid) -> list[tuple[slice, slice]]:
    """Each tile's window on the padded canvas, row by row."""
    h_in, w_in = grid.tile_in
    rows, cols = grid.counts
    return [
        (
            slice(r * grid.tile_out[0], r * grid.tile_out[0] + h_in),
            slice(c * grid.tile_out[1], c * grid.tile_out[1] + w_in),
        )
        for r in range(rows)
        for c in range(cols)
    ]


def tile_centres(outputs: Array, grid: TileGrid) -> Array:
    """(N, C, h, w) network outputs -> (rows, cols, C, out_h, out_w): each tile's centre tile_out, in grid order."""
    out_h, out_w = grid.tile_out
    top = (outputs.shape[-2] - out_h) // 2
    left = (outputs.shape[-1] - out_w) // 2
    centres = outputs[:, :, top : top + out_h, left : left + out_w]
    return centres.reshape(*grid.counts, outputs.shape[1], out_h, out_w)


def joined(mosaic: Array, grid: TileGrid) -> Array:
    """(C, rows, out_h, cols, out_w) tile centres (tile_centres in MOSAIC_ORDER) -> (C, H, W), cropped to the
    image."""
    channels, rows, out_h, cols, out_w = mosaic.shape
    return mosaic.reshape(channels, rows * out_h, cols * out_w)[:, : grid.shape[0], : grid.shape[1]]


def extract_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(H, W) -> (N, h_in, w_in) float32 tiles, mirrored beyond the border (mirror_indices)."""
    padded = image[np.ix_(*mirror_indices(image.shape, grid))]
    return np.ascontiguousarray(np.stack([padded[window] for window in tile_windows(grid)]), dtype=np.float32)


def stitch_tiles(outputs: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(N, C, h, w) network outputs -> (C, H, W): each tile's centre tile_out, placed and cropped to the image."""
    return np.ascontiguousarray(joined(tile_centres(outputs, grid).transpose(MOSAIC_ORDER), grid))


@dataclass(frozen=True)
class Tiler:
    """Cuts images into network inputs and stitches outputs back, for one model's preprocessing and network."""

    preprocess: PreprocessConfig
    architecture: UNetConfig

    def resolve(self, shape: tuple[int, ...], mode: Mode | str) -> Mode:
        """The mode that runs for an image of `shape`: auto picks resize when the image, at the pixel scale the
        model was trained at, has between half and twice the pixels of the resize input (a competition image has
        as many), else tile, which keeps the trained scale (resizing a 2080x2816 image to 572x572 would shrink its
        cells 4x below anything the model saw)."""
        mode = parse_option(Mode, mode, "mode")
        if mode is not Mode.AUTO:
            return mode
        height, width = scaled_size((shape[0], shape[1]), self.preprocess.pixel_scale)
        ratio = height * width / self.preprocess.input_size**2
        return Mode.RESIZE if AUTO_RESIZE_RATIOS[0] <= ratio <= AUTO_RESIZE_RATIOS[1] else Mode.TILE

    def layout(self, shape: tuple[int, ...], mode: Mode | str) -> tuple[Mode, TileGrid]:
        """The mode that runs for an image of `shape` (auto resolved) and its tile grid, whose shape is the size
        the image is resized to before tiling."""
        mode = self.resolve(shape, mode)
        return mode, self.grid(self.working_size(shape, mode), mode)

    def working_size(self, shape: tuple[int, ...], mode: Mode | str) -> tuple[int, int]:
        """The (H, W) the image is resized to before tiling, in a resolved mode (resize or tile)."""
        if parse_option(Mode, mode, "mode") is Mode.RESIZE:
            return self.preprocess.input_size, self.preprocess.input_size
        return scaled_size((shape[0], shape[1]), self.preprocess.pixel_scale)

    def grid(self, shape: tuple[int, int], mode: Mode | str) -> TileGrid:
        """How the working image is tiled for this network: the unpadded network always uses the paper's
        overlap-tile (input_size in); the padded one sees the whole resized image in resize mode (mirrored up to a
        multiple of its stride), and tiles of tile_size with tile_margin of context in tile mode. `mode` is a
        resolved one (resize or tile)."""
        if not self.architecture.padded:
            size = self.preprocess.input_size
            out = self.architecture.output_size(size)
            return TileGrid(shape=shape, tile_out=(out, out), margin=(size - out) // 2)
        if parse_option(Mode, mode, "mode") is Mode.RESIZE:
            stride = self.architecture.stride
            return TileGrid(shape=shape, tile_out=tuple(math.ceil(s / stride) * stride for s in shape), margin=0)
        out = self.preprocess.tile_size - 2 * self.preprocess.tile_margin
        return TileGrid(shape=shape, tile_out=(out, out), margin=self.preprocess.tile_margin)

    def cut(self, image: np.ndarray, mode: Mode | str) -> tuple[np.ndarray, TileGrid, Mode]:
        """(H, W) image -> (N, 1, h, w) float32 normalized tiles, their grid, and the mode that ran."""
        mode, grid = self.layout(image.shape, mode)
        working = resize_image(image, grid.shape)
        return extract_tiles(normalize(working), grid)[:, None], grid, mode

    def stitch(self, outputs: np.ndarray, grid: TileGrid, shape: tuple[int, int]) -> np.ndarray:
        """(N, C, h, w) per-tile outputs -> (C, H, W) at the original image's `shape`."""
        return resize_image(stitch_tiles(outputs, grid), shape)

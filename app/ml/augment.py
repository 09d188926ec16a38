"""Augmentations applied identically to an image and its targets: crop, flips, 90-degree turns, the paper's
elastic deformation, brightness and contrast (the last on the image only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 256
    flips: bool = True
    elastic_std: float = 10.0  # pixels, on the paper's 3x3 coarse grid; 0 turns it off
    elastic_grid: int = 3
    brightness: float = 0.2  # additive, in units of the image's standard deviation
    contrast: float = 0.2  # multiplicative, 1 +- this
    noise: float = 0.05  # Gaussian, in units of the image's standard deviation


@dataclass
class Example:
    """(H, W) float32 normalized image, (H, W) uint8 classes, (H, W) float32 pixel weights."""

    image: np.ndarray
    classes: np.ndarray
    weights: np.ndarray


def random_crop(example: Example, size: int, rng: np.random.Generator) -> Example:
    """A size x size crop (weights as float32); smaller images are mirrored up to size, with zero weight there."""
    example = _pad_to(example, size)
    top = int(rng.integers(0, example.image.shape[0] - size + 1))
    left = int(rng.integers(0, example.image.shape[1] - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return Example(example.image[window], example.classes[window], example.weights[window].astype(np.float32))


def flip_and_turn(example: Example, rng: np.random.Generator) -> Example:
    """One of the 8 symmetries of the square, chosen at random."""
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))

    def apply(array: np.ndarray) -> np.ndarray:
        array = np.rot90(array, turns)
        return np.ascontiguousarray(array[:, ::-1] if flip else array)

    return Example(apply(example.image), apply(example.classes), apply(example.weights))


def elastic(example: Example, std: float, grid: int, rng: np.random.Generator) -> Example:
    """The paper's deformation: random displacements on a coarse grid, interpolated bicubically to every pixel."""
    shape = example.image.shape
    coarse = rng.normal(0.0, std, size=(2, grid, grid))
    field = np.stack([ndimage.zoom(c, np.divide(shape, grid), order=3, mode="nearest") for c in coarse])
    field = field[:, : shape[0], : shape[1]]
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = np.stack([rows + field[0], cols + field[1]])

    def warp(array: np.ndarray, order: int) -> np.ndarray:
        return ndimage.map_coordinates(array, coords, order=order, mode="reflect").astype(array.dtype)

    return Example(warp(example.image, 1), warp(example.classes, 0), warp(example.weights, 1))


def photometric(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Random contrast, brightness and noise on a normalized image."""
    gain = 1.0 + rng.uniform(-config.contrast, config.contrast)
    shift = rng.uniform(-config.brightness, config.brightness)
    noise = rng.normal(0.0, config.noise, size=image.shape) if config.noise else 0.0
    return (image * gain + shift + noise).astype(np.float32)


def augment(example: Example, config: AugmentConfig, rng: np.random.Generator) -> Example:
    """Crop, then the geometric transforms on everything, then photometric ones on the image alone."""
    example = random_crop(example, config.crop, rng)
    if config.flips:
        example = flip_and_turn(example, rng)
    if config.elastic_std > 0:
        example = elastic(example, config.elastic_std, config.elastic_grid, rng)
    return Example(photometric(example.image, config, rng), example.classes, example.weights)


def _pad_to(example: Example, size: int) -> Example:
    pad_h, pad_w = max(size - example.image.shape[0], 0), max(size - example.image.shape[1], 0)
    if not pad_h and not pad_w:
        return example
    pads = ((0, pad_h), (0, pad_w))
    return Example(
        np.pad(example.image, pads, mode="symmetric"),
        np.pad(example.classes, pads, mode="symmetric"),
        np.pad(example.weights, pads, mode="constant"),
    )

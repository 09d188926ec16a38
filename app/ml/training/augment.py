"""Augmentations applied identically to an image and its targets: crop, flips, 90-degree turns, the paper's
elastic deformation, brightness and contrast (the last on the image only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
    """(H, W) float32 normalized image, (H, W) uint8 classes, (H, W) float pixel weights, (H, W) float centre map."""

    image: np.ndarray
    classes: np.ndarray
    weights: np.ndarray
    centre: np.ndarray

    def map(
        self, continuous: Callable[[np.ndarray], np.ndarray], discrete: Callable[[np.ndarray], np.ndarray]
    ) -> Example:
        """The same geometric change on every array: `discrete` for the classes, `continuous` for the rest."""
        return Example(
            continuous(self.image), discrete(self.classes), continuous(self.weights), continuous(self.centre)
        )


def random_crop(example: Example, size: int, rng: np.random.Generator) -> Example:
    """A size x size crop (weights as float32); smaller images are mirrored up to size, with zero weight there."""
    example = _pad_to(example, size)
    top = int(rng.integers(0, example.image.shape[0] - size + 1))
    left = int(rng.integers(0, example.image.shape[1] - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    crop = example.map(lambda a: a[window], lambda a: a[window])
    return replace(crop, weights=crop.weights.astype(np.float32), centre=crop.centre.astype(np.float32))


def flip_and_turn(example: Example, rng: np.random.Generator) -> Example:
    """One of the 8 symmetries of the square, chosen at random."""
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))

    def apply(array: np.ndarray) -> np.ndarray:
        array = np.rot90(array, turns)
        return np.ascontiguousarray(array[:, ::-1] if flip else array)

    return example.map(apply, apply)


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

    return example.map(lambda a: warp(a, 1), lambda a: warp(a, 0))


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
    return replace(example, image=photometric(example.image, config, rng))


def _pad_to(example: Example, size: int) -> Example:
    pad_h, pad_w = max(size - example.image.shape[0], 0), max(size - example.image.shape[1], 0)
    if not pad_h and not pad_w:
        return example
    pads = ((0, pad_h), (0, pad_w))
    mirrored = example.map(lambda a: np.pad(a, pads, mode="symmetric"), lambda a: np.pad(a, pads, mode="symmetric"))
    return replace(mirrored, weights=np.pad(example.weights, pads, mode="constant"))

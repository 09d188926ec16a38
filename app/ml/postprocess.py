"""Network probabilities -> non-overlapping cell instances; the same step in validation and serving."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from app.ml.errors import InvalidOptionError
from app.ml.strict import from_fields
from app.ml.unet import BACKGROUND, CENTRE, INTERIOR


@dataclass(frozen=True)
class InstanceConfig:
    """Thresholds of the instance step; they travel with the model in model.json."""

    foreground_threshold: float = 0.5
    seed_threshold: float = 0.6
    min_seed_area: int = 6
    min_cell_area: int = 24

    @classmethod
    def from_dict(cls, data: dict[str, Any], section: str = "postprocessing") -> InstanceConfig:
        return from_fields(cls, data, section)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: float | int | None) -> InstanceConfig:
        """A copy with the given (non-None) values, each checked against THRESHOLD_RANGES."""
        values = {k: v for k, v in overrides.items() if v is not None}
        for name, value in values.items():
            low, high = THRESHOLD_RANGES[name]
            if not low <= value <= high:
                raise InvalidOptionError(f"{name}={value} is outside the allowed range [{low}, {high}]")
        return InstanceConfig(**{**self.to_dict(), **values})


THRESHOLD_RANGES: dict[str, tuple[float, float]] = {
    "foreground_threshold": (0.05, 0.95),
    "seed_threshold": (0.05, 0.99),
    "min_seed_area": (1, 10_000),
    "min_cell_area": (1, 100_000),
}


@dataclass(frozen=True)
class Instances:
    """(H, W) int32 labels (0 = background, 1..N = cells); per cell, (N,) float32 mean foreground probability
    and (N,) int64 area in pixels; the image's cell type and its probability where a classifier picked one
    (app.ml.celltypes)."""

    labels: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    cell_type: str | None = None
    cell_type_probability: float | None = None

    @property
    def count(self) -> int:
        return int(self.scores.size)


def probabilities_to_instances(probs: np.ndarray, config: InstanceConfig = InstanceConfig()) -> Instances:
    """(3 or 4, H, W) float probabilities (background, interior, border[, centre]) -> Instances."""
    return maps_to_instances(instance_maps(probs), config)


def instance_maps(probs: np.ndarray) -> np.ndarray:
    """(..., 3 or 4, H, W) probabilities -> (..., 2, H, W) float32: the foreground and the seed map.

    The seed map is the centre map where the model has one, else the interior probability. They are all the
    instance step reads, so the service resizes these two maps to the image's size rather than every class.
    """
    seed_channel = CENTRE if probs.shape[-3] > CENTRE else INTERIOR
    maps = np.stack((1.0 - probs[..., BACKGROUND, :, :], probs[..., seed_channel, :, :]), axis=-3)
    return maps.astype(np.float32, copy=False)


def maps_to_instances(maps: np.ndarray, config: InstanceConfig = InstanceConfig()) -> Instances:
    """(2, H, W) foreground probability and seed map (see instance_maps) -> Instances.

    Seeds are connected regions of the seed map over its threshold; a watershed restricted to the foreground
    grows them over the rest, so cells that touch stay apart. Foreground blobs without any seed become cells.
    """
    foreground_prob, interior_prob = maps
    foreground = foreground_prob > config.foreground_threshold
    seeds = _seeds(interior_prob > config.seed_threshold, foreground, config.min_seed_area)
    border_minus_interior = foreground_prob - 2.0 * interior_prob
    labels = grow_seeds(border_minus_interior, seeds, foreground)
    labels = _add_unseeded_blobs(labels, foreground)
    return _keep_large(labels, foreground, foreground_prob, config.min_cell_area)


def grow_seeds(landscape: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """skimage's watershed of `seeds` over `landscape` within `mask`, with the seeds' inner pixels left out.

    A seed pixel whose four neighbours all belong to its seed can label nothing new: every pixel it could reach
    is already labelled. Leaving those out of the flood, and putting them back after, gives the same labels
    with fewer pixels through the watershed's priority queue (docs/performance.md).
    Seeds are 4-connected components, so a pixel's four seed neighbours always carry its own label.
    """
    inner = _inner_pixels(seeds > 0)
    grown = watershed(landscape, markers=np.where(inner, 0, seeds), mask=mask & ~inner)
    return np.where(inner, seeds, grown)


def _inner_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` whose four neighbours are all in it (image edges count as outside): the binary erosion
    by a cross, as four shifted ANDs, which are faster than ndimage.binary_erosion (docs/performance.md)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1]] = False
    inner[:, [0, -1]] = False
    return inner


def _seeds(candidates: np.ndarray, foreground: np.ndarray, min_area: int) -> np.ndarray:
    seeded = candidates & foreground
    markers, count = ndimage.label(seeded)
    # Counted over the seed pixels alone, a small part of the image, not over all of it.
    keep = np.bincount(markers[seeded], minlength=count + 1) >= min_area
    keep[0] = False
    return np.take(_renumbering(keep), markers)


def _add_unseeded_blobs(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    blobs, count = ndimage.label(foreground & (labels == 0))
    if count:
        labels = np.where(blobs > 0, blobs + labels.max(), labels)
    return labels


def _keep_large(labels: np.ndarray, foreground: np.ndarray, foreground_prob: np.ndarray, min_area: int) -> Instances:
    """Drop cells under min_area pixels, renumber the rest 1..N, and measure each one's area and mean score.

    Every label lies inside the foreground, so areas and sums are counted over its pixels only (a fifth of the
    image), and one lookup pass renumbers the whole image.
    """
    inside = np.flatnonzero(foreground)
    ids = np.take(labels, inside)
    count = int(labels.max(initial=0))
    areas = np.bincount(ids, minlength=count + 1)
    sums = np.bincount(ids, weights=np.take(foreground_prob, inside), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    return Instances(
        labels=np.take(_renumbering(keep), labels),
        scores=(sums[keep] / areas[keep]).astype(np.float32),
        areas=areas[keep],
    )


def _renumbering(keep: np.ndarray) -> np.ndarray:
    """Lookup table: old label -> 1..K for the K kept labels (in order), 0 for every other (keep[0] is False)."""
    table = np.zeros(keep.size, dtype=np.int32)
    table[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return table

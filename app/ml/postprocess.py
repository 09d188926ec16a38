"""Network probabilities -> non-overlapping cell instances; the same step in validation and serving."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from app.ml.errors import InvalidOptionError
from app.ml.targets import BACKGROUND, BORDER, INTERIOR


@dataclass(frozen=True)
class InstanceConfig:
    """Thresholds of the instance step; they travel with the model in model.json."""

    foreground_threshold: float = 0.5
    seed_threshold: float = 0.6
    min_seed_area: int = 6
    min_cell_area: int = 24

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceConfig:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

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
    """(H, W) int32 labels (0 = background, 1..N = cells) and (N,) float32 mean foreground probability."""

    labels: np.ndarray
    scores: np.ndarray

    @property
    def count(self) -> int:
        return int(self.scores.size)


def probabilities_to_instances(probs: np.ndarray, config: InstanceConfig = InstanceConfig()) -> Instances:
    """(3, H, W) float probabilities (background, interior, border) -> Instances.

    Seeds are connected interior regions; a watershed restricted to the foreground grows them over the border
    class, so cells that touch stay apart. Foreground blobs without any seed become cells of their own.
    """
    foreground_prob = 1.0 - probs[BACKGROUND]
    foreground = foreground_prob > config.foreground_threshold
    seeds = _seeds(probs[INTERIOR] > config.seed_threshold, foreground, config.min_seed_area)
    labels = watershed(probs[BORDER] - probs[INTERIOR], markers=seeds, mask=foreground)
    labels = _add_unseeded_blobs(labels, foreground)
    labels = _drop_small(labels, config.min_cell_area)
    return Instances(labels=labels, scores=mean_per_label(foreground_prob, labels))


def mean_per_label(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of `values` over each label 1..max(labels), vectorized -> (N,) float32."""
    count = int(labels.max(initial=0))
    sums = np.bincount(labels.ravel(), weights=values.ravel(), minlength=count + 1)[1:]
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return (sums / np.maximum(sizes, 1)).astype(np.float32)


def _seeds(candidates: np.ndarray, foreground: np.ndarray, min_area: int) -> np.ndarray:
    markers, _ = ndimage.label(candidates & foreground)
    sizes = np.bincount(markers.ravel())
    small = sizes < min_area
    small[0] = True
    markers[small[markers]] = 0
    return markers


def _add_unseeded_blobs(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    blobs, count = ndimage.label(foreground & (labels == 0))
    if count:
        labels = np.where(blobs > 0, blobs + labels.max(), labels)
    return labels


def _drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Remove labels under min_area pixels and renumber the rest 1..N in one lookup pass."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    renumber = np.zeros(sizes.size, dtype=np.int32)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return renumber[labels]

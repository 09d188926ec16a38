"""The classifier that tells an image's cell type from the network's maps, and the features it reads.

Astrocytes (large, thin, few), cortical neurons (small, sparse) and SH-SY5Y cells (small, dense) want different
thresholds (app.ml.rules). The classifier reads the type from the maps under the default thresholds (how much of the
image is foreground, how much of the foreground and of the seeds is edge: small cells have more edge for their area,
and the seeds' share of the foreground) and from the image's contrast (astrocyte images are faint: a sparse astrocyte
image has cells like a cortical one, not its contrast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.ml.postprocess import InstanceConfig
from app.ml.strict import check_keys

FEATURES = (
    "foreground fraction",
    "log foreground edge share",
    "log seed edge share",
    "seed share of foreground",
    "relative contrast",
)
# Classifiers fitted on other features, which this code no longer computes: on the cells of a first instance step
# (before the maps' features made that step unneeded), and before that with a plain standard deviation as contrast.
RETIRED_FEATURES = (
    ("log cells per 100k px", "log median area", "foreground fraction", "relative contrast"),
    ("log cells per 100k px", "log median area", "foreground fraction", "image contrast"),
)


def image_contrast(image: np.ndarray) -> float:
    """(H, W) float image -> its standard deviation over its mean: the same for 8-bit, 12-bit and 16-bit pixels of
    one scene (a plain standard deviation made a 12-bit image in a 16-bit file look as faint as astrocytes)."""
    return float(np.std(image)) / max(float(np.mean(image)), 1e-6)


def map_features(maps: Any, contrast: float, config: InstanceConfig) -> np.ndarray:
    """(2, H, W) foreground and seed maps (numpy, or a tensor wherever it is), the image_contrast of their image and
    the default thresholds -> (5,) float64 features that do not depend on the image's size: see FEATURES. A few
    whole-image passes, no instance step."""
    foreground = maps[0] > config.foreground_threshold
    seeds = (maps[1] > config.seed_threshold) & foreground
    foreground_pixels, seed_pixels = _count(foreground), _count(seeds)
    return np.array(
        [
            foreground_pixels / (foreground.shape[0] * foreground.shape[1]),
            np.log(_edge_pixels(foreground) / max(foreground_pixels, 1) + 1e-3),
            np.log(_edge_pixels(seeds) / max(seed_pixels, 1) + 1e-3),
            seed_pixels / max(foreground_pixels, 1),
            contrast,
        ]
    )


def _count(mask: Any) -> int:
    return int(mask.sum())


def _edge_pixels(mask: Any) -> int:
    """Pixels of an (H, W) boolean mask (numpy or torch) with a 4-neighbour outside it; the image's border counts as
    outside."""
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return _count(mask) - _count(inner)


@dataclass(frozen=True)
class CellTypeClassifier:
    """Nearest centroid over standardized features (FEATURES); the probability is a softmax of -distance^2 / 2."""

    types: list[str]
    centroids: list[list[float]]
    mean: list[float]
    scale: list[float]

    @classmethod
    def fit(cls, features: np.ndarray, types: list[str]) -> CellTypeClassifier:
        """(N, F) features of N labelled images and their N cell types -> a classifier."""
        mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
        standard = (features - mean) / scale
        names = sorted(set(types))
        centroids = [standard[[t == name for t in types]].mean(axis=0).tolist() for name in names]
        return cls(names, centroids, mean.tolist(), scale.tolist())

    def predict(self, features: np.ndarray) -> tuple[str, float]:
        """(F,) features -> (cell type, its probability)."""
        standard = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        squared = ((np.asarray(self.centroids) - standard) ** 2).sum(axis=1)
        weights = np.exp(-(squared - squared.min()) / 2.0)
        best = int(np.argmax(weights))
        return self.types[best], float(weights[best] / weights.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(FEATURES),
            "types": self.types,
            "centroids": self.centroids,
            "mean": self.mean,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellTypeClassifier:
        check_keys(data, {"features", "types", "centroids", "mean", "scale"}, "postprocessing.cell_type_classifier")
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"cell type classifier features {data.get('features')} are not {list(FEATURES)}")
        return cls(list(data["types"]), data["centroids"], data["mean"], data["scale"])

"""Instance thresholds per cell type, and the classifier that tells an image's cell type from the network's maps.

Astrocytes (large, thin, few), cortical neurons (small, sparse) and SH-SY5Y cells (small, dense) want different
thresholds. The classifier reads the type from the maps under the default thresholds (how much of the image is
foreground, how much of the foreground and of the seeds is edge: small cells have more edge for their area, and the
seeds' share of the foreground) and from the image's contrast (astrocyte images are faint: a sparse astrocyte image
has cells like a cortical one, not its contrast); then the instance step runs once, with that type's thresholds
where it has its own. The answer says which type was picked and how sure the classifier was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from app.ml.postprocess import InstanceConfig, Instances, maps_to_instances
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
log = logging.getLogger("cellseg.celltypes")
InstanceStep = Callable[[Any, InstanceConfig], Instances]


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


@dataclass(frozen=True)
class InstanceRules:
    """The model's whole instance step: default thresholds, per-type thresholds, and the type classifier.

    In model.json, "postprocessing" holds the default thresholds' keys, plus "per_cell_type" and
    "cell_type_classifier" when the model has them.
    """

    default: InstanceConfig = field(default_factory=InstanceConfig)
    per_cell_type: dict[str, InstanceConfig] = field(default_factory=dict)
    classifier: CellTypeClassifier | None = None
    # A type's own thresholds apply only when the classifier is at least this sure: thresholds made for
    # astrocytes drop most cells of a SH-SY5Y image, so an unsure pick keeps the default ones.
    min_probability: float = 0.75

    def with_overrides(self, **overrides: float | int | None) -> InstanceRules:
        """The caller's thresholds beat the model's, whatever the cell type."""
        return InstanceRules(
            self.default.with_overrides(**overrides),
            {name: config.with_overrides(**overrides) for name, config in self.per_cell_type.items()},
            self.classifier,
            self.min_probability,
        )

    def find(self, maps: Any, contrast: float, step: InstanceStep = maps_to_instances) -> Instances:
        """(2, H, W) foreground and seed maps (postprocess.instance_maps) and the image_contrast of their image ->
        the cells, with the cell type. `step` turns maps into cells: the numpy reference, or one that takes the
        maps where they are (a tensor on the GPU, app.ml.serving.gpu_instances)."""
        if self.classifier is None:
            return step(maps, self.default)
        cell_type, probability = self.classifier.predict(map_features(maps, contrast, self.default))
        sure = probability >= self.min_probability
        config = self.per_cell_type.get(cell_type, self.default) if sure else self.default
        return replace(step(maps, config), cell_type=cell_type, cell_type_probability=probability)

    def for_cell_type(self, cell_type: str, config: InstanceConfig) -> InstanceRules:
        return replace(self, per_cell_type={**self.per_cell_type, cell_type: config})

    def to_dict(self) -> dict[str, Any]:
        data = self.default.to_dict()
        if self.per_cell_type:
            data["per_cell_type"] = {name: config.to_dict() for name, config in sorted(self.per_cell_type.items())}
        if self.classifier is not None:
            data["cell_type_classifier"] = {**self.classifier.to_dict(), "min_probability": self.min_probability}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceRules:
        per_type = data.get("per_cell_type", {})
        classifier = dict(data.get("cell_type_classifier") or {})
        min_probability = classifier.pop("min_probability", cls.min_probability)
        if tuple(classifier.get("features", ())) in RETIRED_FEATURES:
            log.warning(
                "this model's cell-type classifier reads retired features: it is not used, and the default "
                "thresholds apply to every image; `tune --model <its folder>` fits it again"
            )
            per_type, classifier = {}, {}
        default_keys = {k: v for k, v in data.items() if k not in ("per_cell_type", "cell_type_classifier")}
        return cls(
            InstanceConfig.from_dict(default_keys),
            {
                name: InstanceConfig.from_dict(values, f"postprocessing.per_cell_type.{name}")
                for name, values in per_type.items()
            },
            CellTypeClassifier.from_dict(classifier) if classifier else None,
            min_probability,
        )

"""The model's whole instance step: its default thresholds, thresholds per cell type, and the classifier that
picks the type (app.ml.celltypes). The type is read from the maps first; then the instance step runs once, with that
type's thresholds where it has its own and the classifier is sure enough. The answer says which type was picked and
how sure the classifier was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from app.ml.celltypes import RETIRED_FEATURES, CellTypeClassifier, map_features
from app.ml.postprocess import InstanceConfig, Instances, maps_to_instances

log = logging.getLogger("cellseg.rules")
InstanceStep = Callable[[Any, InstanceConfig], Instances]


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

    def choose(self, maps: Any, contrast: float) -> tuple[InstanceConfig, str | None, float | None]:
        """(2, H, W) foreground and seed maps and the image_contrast of their image -> the thresholds for them (the
        cell type's own where the classifier is sure enough of it, else the default ones), the type and its
        probability (None and None without a classifier)."""
        if self.classifier is None:
            return self.default, None, None
        cell_type, probability = self.classifier.predict(map_features(maps, contrast, self.default))
        sure = probability >= self.min_probability
        return self.per_cell_type.get(cell_type, self.default) if sure else self.default, cell_type, probability

    def find(self, maps: Any, contrast: float, step: InstanceStep = maps_to_instances) -> Instances:
        """(2, H, W) foreground and seed maps (postprocess.instance_maps) and the image_contrast of their image ->
        the cells, with the cell type. `step` turns maps into cells: the numpy reference, or one that takes the
        maps where they are (a tensor on the GPU, app.ml.serving.gpu_instances)."""
        config, cell_type, probability = self.choose(maps, contrast)
        if cell_type is None:
            return step(maps, config)
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

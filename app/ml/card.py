"""The model card: everything model.json says about a model, written and read only through `ModelCard`.

How to rebuild and run the network (architecture, preprocessing, the instance step, inference) is read strictly:
an unknown key is refused with its name, so nothing written there goes unheeded. What the card records about the
model's history (the training command, the data, the scores) is kept as written.

format_version 2 dropped two keys that version 1 wrote and nothing read (preprocessing.normalization, always
"zscore", and inference.default_mode, always "resize"); version 1 cards are read by dropping them (and by reading
the first cards' single training.data.path as paths). format_version 3 added postprocessing_by_tta (none before).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePath
from typing import Any

from app.ml.options import TTA_CHOICES
from app.ml.rules import InstanceRules
from app.ml.strict import as_object, check_keys, from_fields
from app.ml.transforms import PreprocessConfig
from app.ml.unet import UNetConfig

FORMAT_VERSION = 3
_PATH_ARGS = ("data", "out", "init")  # train's options that name paths on the training machine
_DROPPED_IN_2 = {"preprocessing": ("normalization", "zscore"), "inference": ("default_mode", "resize")}


@dataclass(frozen=True)
class InferenceSettings:
    """half_precision: whether the model was validated in reduced precision (float16 on CUDA, bfloat16 on CPUs
    with native support), so serving may compute in it."""

    half_precision: bool = True


@dataclass(frozen=True)
class WeightsFile:
    """The weights file in the model folder and its sha256, checked on every load."""

    file: str
    sha256: str


@dataclass(frozen=True)
class TrainingData:
    """Which data trained the model: folders (and the layout of each), a fingerprint of their contents, the
    train/validation split, and the median diameter of the training cells as the network saw them (pixels at its
    scale; 0 where not recorded), which fine-tuning rescales a lab's cells to."""

    paths: list[str] = field(default_factory=list)
    fingerprint: str = ""
    images: int = 0
    train_cells: int = 0
    split: dict[str, Any] | None = None
    cell_diameter: float = 0.0
    layouts: dict[str, str] = field(default_factory=dict)  # folder -> the layout its labels were read in


@dataclass(frozen=True)
class TrainingRecord:
    """How the model was trained: `train`'s options (args), its data, a summary of the run, and the model it
    started from (version and weights' sha256) when it was fine-tuned from one."""

    args: dict[str, Any] = field(default_factory=dict)
    data: TrainingData = field(default_factory=TrainingData)
    summary: dict[str, Any] = field(default_factory=dict)
    started_from: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingRecord:
        check_keys(data, {"args", "data", "summary", "started_from"}, "training")
        return cls(
            dict(data.get("args", {})),
            from_fields(TrainingData, data.get("data", {}), "training.data"),
            dict(data.get("summary", {})),
            dict(data.get("started_from", {})),
        )


@dataclass(frozen=True)
class ModelCard:
    """model.json of one model folder."""

    version: str
    architecture: UNetConfig
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    postprocessing: InstanceRules = field(default_factory=InstanceRules)
    # The instance step chosen on the maps averaged over that many test-time augmentation views (`tune --tta N`):
    # averaged maps are smoother, and thresholds chosen on single views serve them worse than single views.
    postprocessing_by_tta: dict[int, InstanceRules] = field(default_factory=dict)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    training: TrainingRecord | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    code_version: str = ""
    weights: WeightsFile | None = None
    format_version: int = FORMAT_VERSION

    @property
    def split(self) -> dict[str, Any] | None:
        """The train/validation split the model was trained with, if the card records one."""
        return self.training.data.split if self.training else None

    @property
    def validation_score(self) -> float | None:
        validation = self.metrics.get("validation")
        return validation.get("score") if isinstance(validation, dict) else None

    def rules_for_tta(self, tta: int) -> InstanceRules:
        """The instance step for maps averaged over `tta` views: chosen for them where the card has it, else the
        one chosen without test-time augmentation."""
        return self.postprocessing_by_tta.get(tta, self.postprocessing)

    def without_host_paths(self) -> ModelCard:
        """The card as the service shows it: the training record keeps the data folders' names, not the paths of
        the machine that trained the model (nor its output and starting-point paths)."""
        if self.training is None:
            return self
        data = self.training.data
        names = [PurePath(path).name for path in data.paths]
        layouts = {PurePath(path).name: layout for path, layout in data.layouts.items()}
        args = {key: value for key, value in self.training.args.items() if key not in _PATH_ARGS}
        started_from = {key: value for key, value in self.training.started_from.items() if key != "path"}
        training = replace(
            self.training, args=args, data=replace(data, paths=names, layouts=layouts), started_from=started_from
        )
        return replace(self, training=training)

    def with_weights(self, file: str, sha256: str) -> ModelCard:
        return replace(self, weights=WeightsFile(file, sha256), format_version=FORMAT_VERSION)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "version": self.version,
            "created_at": self.created_at,
            "code_version": self.code_version,
            "architecture": self.architecture.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "postprocessing": self.postprocessing.to_dict(),
            "postprocessing_by_tta": {str(tta): rules.to_dict() for tta, rules in self.postprocessing_by_tta.items()},
            "inference": asdict(self.inference),
            "training": asdict(self.training) if self.training else None,
            "metrics": self.metrics,
            "weights": asdict(self.weights) if self.weights else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """ValueError naming the section and key when the card has a key nobody reads, or is of an unknown format."""
        data = _upgrade(check_keys(data, set(cls.__dataclass_fields__), "model.json"))
        if "architecture" not in data:
            raise ValueError("model.json has no 'architecture': it was not written by `train`")
        return cls(
            version=str(data.get("version", "")),
            architecture=UNetConfig.from_dict(data["architecture"]),
            preprocessing=PreprocessConfig.from_dict(data.get("preprocessing", {})),
            postprocessing=InstanceRules.from_dict(data.get("postprocessing", {})),
            postprocessing_by_tta=_rules_by_tta(data.get("postprocessing_by_tta", {})),
            inference=from_fields(InferenceSettings, data.get("inference", {}), "inference"),
            training=TrainingRecord.from_dict(data["training"]) if data.get("training") else None,
            metrics=dict(as_object(data.get("metrics", {}), "metrics")),
            created_at=str(data.get("created_at", "")),
            code_version=str(data.get("code_version", "")),
            weights=from_fields(WeightsFile, data["weights"], "weights") if data.get("weights") else None,
            format_version=FORMAT_VERSION,
        )


def _rules_by_tta(data: Any) -> dict[int, InstanceRules]:
    """postprocessing_by_tta: views ("2", "4", "8") -> rules; ValueError for a key that is no such number of views."""
    checked = check_keys(data, {str(tta) for tta in TTA_CHOICES if tta > 1}, "postprocessing_by_tta")
    return {int(views): InstanceRules.from_dict(rules) for views, rules in sorted(checked.items())}


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A card of an earlier format_version in the current format; ValueError for one written by newer code."""
    version = data.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"format_version {version!r} is not one this code reads (1 to {FORMAT_VERSION}): "
            "the model was written by a newer cellseg; upgrade cellseg to serve it"
        )
    if version >= 2:
        return data
    upgraded = dict(data)
    for section, (key, only_value) in _DROPPED_IN_2.items():
        values = dict(upgraded.get(section) or {})
        if values.get(key, only_value) != only_value:
            raise ValueError(f"'{section}.{key}' is {values[key]!r}; only {only_value!r} was ever supported")
        values.pop(key, None)
        upgraded[section] = values
    training = upgraded.get("training")
    if isinstance(training, dict) and isinstance(training.get("data"), dict) and "path" in training["data"]:
        data = dict(training["data"])  # the first cards, from a `train` of one folder
        data["paths"] = [data.pop("path")]
        upgraded["training"] = {**training, "data": data}
    return upgraded

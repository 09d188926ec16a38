"""Which labelled images train and which validate: by whole sample, by rows of every image, or every image with
none held out (a cross-validated run, scored out of fold)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from app.ml.data.kaggle import Sample
from app.ml.errors import DatasetError


class Records(Protocol):
    """A labelled data set as the split reads it: records with image_id, sample_id and cell_type, and load(i)."""

    records: list
    image_ids: list[str]

    def load(self, index: int) -> Sample: ...


@dataclass(frozen=True)
class Split:
    """Which images train and which validate. kind 'sample': whole images by sample_id. kind 'rows': every
    image's bottom `holdout_rows` fraction validates and the rest trains (for one-image datasets). kind 'all':
    every image trains and none validates (cross-validation chose and scored the instance step)."""

    kind: str
    train_ids: list[str]
    val_ids: list[str]
    holdout_rows: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "holdout_rows": self.holdout_rows, "train": self.train_ids, "val": self.val_ids}

    @classmethod
    def from_dict(cls, data: dict) -> Split:
        return cls(data["kind"], list(data["train"]), list(data["val"]), float(data.get("holdout_rows", 0.0)))


def split_by_sample(dataset: Records, val_fraction: float, seed: int) -> Split:
    """Put whole sample_ids in validation, about val_fraction of each cell type's samples (at least one of every
    type that has two or more), so no sample is in both sets and every type is validated. Same seed, same split."""
    types_of = {r.sample_id: r.cell_type for r in dataset.records}
    if len(types_of) < 2:
        raise ValueError(
            f"the data has {len(types_of)} sample_id; a split by sample needs at least 2. "
            "Use --holdout-rows to validate on the bottom part of every image instead"
        )
    rng = np.random.default_rng(seed)
    val_samples: set[str] = set()
    for cell_type in sorted(set(types_of.values())):
        samples = sorted(s for s, t in types_of.items() if t == cell_type)
        n_val = min(max(1, round(val_fraction * len(samples))), len(samples) - 1)
        val_samples.update(samples[i] for i in rng.permutation(len(samples))[:n_val])
    if not val_samples:  # every type has a single sample: validate on one of them
        val_samples.add(sorted(types_of)[int(rng.integers(len(types_of)))])
    train = [r.image_id for r in dataset.records if r.sample_id not in val_samples]
    val = [r.image_id for r in dataset.records if r.sample_id in val_samples]
    return Split("sample", train, val)


def split_by_rows(dataset: Records, holdout_rows: float) -> Split:
    if not 0.0 < holdout_rows < 1.0:
        raise ValueError(f"--holdout-rows must be between 0 and 1, got {holdout_rows}")
    ids = dataset.image_ids
    return Split("rows", ids, ids, holdout_rows)


def split_rows(sample: Sample, holdout_rows: float) -> tuple[Sample, Sample]:
    """(top part for training, bottom `holdout_rows` fraction for validation) of one image.

    Cells are cut at the line and renumbered in each part; cells the line leaves with no pixels disappear.
    """
    cut = sample.image.shape[0] - max(1, round(sample.image.shape[0] * holdout_rows))
    return _rows(sample, slice(0, cut)), _rows(sample, slice(cut, None))


def _rows(sample: Sample, rows: slice) -> Sample:
    labels = sample.labels[rows]
    present = np.unique(labels[labels > 0])
    renumber = np.zeros(int(sample.labels.max()) + 1, dtype=np.int32)
    renumber[present] = np.arange(1, present.size + 1)
    types = [sample.cell_types[i - 1] for i in present] if sample.cell_types else []
    return Sample(sample.image_id, sample.image[rows], renumber[labels], types, dict(sample.metadata))


def load_split(dataset: Records, split: Split) -> tuple[list[Sample], list[Sample]]:
    """Load the (train, validation) Samples a split names; DatasetError naming the images the data lacks."""
    index = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    missing = [i for i in (*split.train_ids, *split.val_ids) if i not in index]
    if missing:
        raise DatasetError(
            f"the split names {len(missing)} image(s) these folders do not hold, e.g. {missing[:3]}: give the folders "
            "the model was trained on (its model.json lists them under training.data.paths)"
        )
    if split.kind == "rows":
        parts = [split_rows(dataset.load(index[i]), split.holdout_rows) for i in split.train_ids]
        return [p[0] for p in parts], [p[1] for p in parts]
    return [dataset.load(index[i]) for i in split.train_ids], [dataset.load(index[i]) for i in split.val_ids]


def cross_validated(split: dict | None) -> bool:
    """Whether a recorded split is a cross-validated run's: every image trained, the instance step chosen and scored
    on its folds' out-of-fold maps."""
    return split is not None and split.get("kind") == "all"

"""Training data: the train/validation split, targets computed once per image, and deterministic crops.

Every random choice of an epoch derives from (seed, epoch, position), never from a global generator, so an
epoch is the same whatever the number of DataLoader workers or processes, and a resumed run replays it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from app.ml.data.kaggle import KaggleDataset, KaggleFolders, Sample
from app.ml.data.labelled import LabelledFolders
from app.ml.training.augment import AugmentConfig, Example, augment, random_crop
from app.ml.training.targets import centre_map, label_to_classes, weight_map
from app.ml.transforms import normalize, resize_image, resize_labels, scaled_size


@dataclass(frozen=True)
class TargetConfig:
    border_width: int = 1
    w0: float = 10.0
    sigma: float = 5.0


@dataclass(frozen=True)
class Split:
    """Which images train and which validate. kind 'sample': whole images by sample_id. kind 'rows': every
    image's bottom `holdout_rows` fraction validates and the rest trains (for one-image datasets)."""

    kind: str
    train_ids: list[str]
    val_ids: list[str]
    holdout_rows: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "holdout_rows": self.holdout_rows, "train": self.train_ids, "val": self.val_ids}

    @classmethod
    def from_dict(cls, data: dict) -> Split:
        return cls(data["kind"], list(data["train"]), list(data["val"]), float(data.get("holdout_rows", 0.0)))


def split_by_sample(dataset: KaggleDataset | KaggleFolders | LabelledFolders, val_fraction: float, seed: int) -> Split:
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


def split_by_rows(dataset: KaggleDataset | KaggleFolders | LabelledFolders, holdout_rows: float) -> Split:
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


def load_split(
    dataset: KaggleDataset | KaggleFolders | LabelledFolders, split: Split
) -> tuple[list[Sample], list[Sample]]:
    """Load the (train, validation) Samples a split names."""
    index = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    if split.kind == "rows":
        parts = [split_rows(dataset.load(index[i]), split.holdout_rows) for i in split.train_ids]
        return [p[0] for p in parts], [p[1] for p in parts]
    return [dataset.load(index[i]) for i in split.train_ids], [dataset.load(index[i]) for i in split.val_ids]


def prepare_example(sample: Sample, pixel_scale: tuple[float, float], targets: TargetConfig) -> Example:
    """A sample at the model's pixel scale with its classes and weight map: computed once, then cropped often."""
    size = scaled_size(sample.image.shape, pixel_scale)
    labels = resize_labels(sample.labels, size)
    classes = label_to_classes(labels, targets.border_width)
    weights = weight_map(labels, classes, targets.w0, targets.sigma)
    # float16 halves the cache; weights and centres are only ever compared with outputs in a loss.
    image = normalize(resize_image(sample.image, size))
    return Example(image, classes, weights.astype(np.float16), centre_map(labels).astype(np.float16))


@dataclass(frozen=True)
class Item:
    """One crop of one epoch: where it comes from and what seeds its randomness."""

    epoch: int
    position: int
    image: int


class EpochSampler(Sampler[Item]):
    """Yields this process's Items of one epoch, optionally starting after the first `skip` of them.

    Images are drawn in shuffled rounds (image i `draws[i]` times per round, once by default) until the epoch has
    `epoch_size` items; process `rank` of `world` takes every world-th of them.
    """

    def __init__(self, draws: int | list[int], epoch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.pool = np.arange(draws) if isinstance(draws, int) else np.repeat(np.arange(len(draws)), draws)
        self.epoch_size, self.seed = epoch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def items(self, epoch: int) -> list[Item]:
        rng = np.random.default_rng([self.seed, epoch])
        rounds = math.ceil(self.epoch_size / self.pool.size)
        order = np.concatenate([rng.permutation(self.pool) for _ in range(rounds)])[: self.epoch_size]
        return [Item(epoch, p, int(i)) for p, i in enumerate(order)][self.rank :: self.world]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items(self.epoch)[self.skip :])

    def __len__(self) -> int:
        return len(self.items(self.epoch)) - self.skip


class CropDataset(Dataset):
    """Items -> (image (1, c, c) float32, classes (c, c) int64, weights (c, c) float32, centre (c, c) float32)."""

    def __init__(self, examples: list[Example], augment_config: AugmentConfig, seed: int, enabled: bool = True) -> None:
        self.examples, self.config, self.seed, self.enabled = examples, augment_config, seed, enabled

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, item.epoch, item.position, 1])
        source = self.examples[item.image]
        crop = augment(source, self.config, rng) if self.enabled else random_crop(source, self.config.crop, rng)
        return (
            torch.from_numpy(np.ascontiguousarray(crop.image))[None],
            torch.from_numpy(np.ascontiguousarray(crop.classes)).long(),
            torch.from_numpy(np.ascontiguousarray(crop.weights, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(crop.centre, dtype=np.float32)),
        )

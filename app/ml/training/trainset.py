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

from app.ml.data.kaggle import Sample
from app.ml.training.augment import AugmentConfig, Example, augment, random_crop
from app.ml.training.targets import centre_map, label_to_classes, weight_map
from app.ml.transforms import normalize, resize_image, resize_labels, scaled_size


@dataclass(frozen=True)
class TargetConfig:
    border_width: int = 1
    w0: float = 10.0
    sigma: float = 5.0


def prepare_example(
    sample: Sample, pixel_scale: tuple[float, float], targets: TargetConfig, unknown_edge: int = 0
) -> Example:
    """A sample at the model's pixel scale with its classes and weight map: computed once, then cropped often.

    `unknown_edge`: background within this many pixels (at the model's scale) of the image's edge is not taught
    (weight 0), for labels that leave out the cells the edge cuts."""
    size = scaled_size(sample.image.shape, pixel_scale)
    labels = resize_labels(sample.labels, size)
    classes = label_to_classes(labels, targets.border_width)
    weights = weight_map(labels, classes, targets.w0, targets.sigma)
    if unknown_edge > 0:
        weights[(labels == 0) & ~_inner_region(labels.shape, unknown_edge)] = 0.0
    # float16 halves the cache; weights and centres are only ever compared with outputs in a loss.
    image = normalize(resize_image(sample.image, size))
    return Example(image, classes, weights.astype(np.float16), centre_map(labels).astype(np.float16))


def _inner_region(shape: tuple[int, int], margin: int) -> np.ndarray:
    """(H, W) bool: True farther than `margin` pixels from every edge."""
    inner = np.zeros(shape, dtype=bool)
    inner[margin : shape[0] - margin, margin : shape[1] - margin] = True
    return inner


def median_cell_diameter(label_images: list[np.ndarray]) -> float:
    """The median over every labelled cell of its equivalent diameter (that of a disk of its area), in pixels."""
    areas = np.concatenate([np.bincount(labels.ravel())[1:] for labels in label_images] or [np.zeros(0)])
    areas = areas[areas > 0]
    return float(2.0 * np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0


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

"""Defaults for teaching a trained model a lab's own cells from a few labelled images (`train --init MODEL`).

A lab brings a handful of images whose cells may be of another size, line and microscope than the model's. What
`train` then picks, for every option the command line leaves out (docs/finetune.md has the measurements):
- the working scale: the lab's cells are rescaled so that their median diameter becomes the one the model was
  trained at (as Cellpose rescales to its model's mean diameter), recorded in its card;
- the schedule: steps from the number of labelled cells, within bounds, at a fine-tuning learning rate, with crops
  a few cells wide;
- validation: with few images, k-fold cross-validation (leave-one-out up to 5 images): each fold trains on the
  others and predicts its held-out images, the instance step is chosen on those out-of-fold maps only, and the model
  kept is trained on every image;
- labels that leave out the cells cut by the image's edge do not teach that edge's background.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.ml.checkpoint import read_card
from app.ml.errors import CheckpointError
from app.ml.training.config import TrainConfig
from app.ml.training.trainset import median_cell_diameter

log = logging.getLogger("cellseg.train")

STEPS_PER_CELL = 10
MIN_STEPS, MAX_STEPS = 320, 1200
CROPS_PER_EPOCH = 64
FINETUNE_LR = 5e-4
MAX_FOLDS = 5
FOLDS_UP_TO_IMAGES = 20  # more images than this: a plain held-out split is enough, and cheaper


@dataclass(frozen=True)
class LabelledSet:
    """What the plan reads of the data: how many images and cells, the cells' median diameter and the images'
    shortest side, in pixels."""

    images: int
    cells: int
    cell_diameter: float
    shortest_side: int = 0

    @classmethod
    def of(cls, label_images: list[Any]) -> LabelledSet:
        cells = sum(int(labels.max()) for labels in label_images)
        shortest = min((min(labels.shape) for labels in label_images), default=0)
        return cls(len(label_images), cells, median_cell_diameter(label_images), shortest)


def finetune_plan(base_diameter: float, data: LabelledSet, batch_size: int) -> dict[str, Any]:
    """The options a fine-tuning run takes by default for this data, from a model trained on cells of
    `base_diameter` pixels (at its scale)."""
    steps = min(max(STEPS_PER_CELL * data.cells, MIN_STEPS), MAX_STEPS)
    epochs = math.ceil(steps * batch_size / CROPS_PER_EPOCH)
    # A few cells across, no larger than the images at the working scale (a crop beyond them is padding), and a
    # multiple of 16 the network's poolings divide.
    crop = min(256, max(128, _multiple_of_16(6 * base_diameter)))
    if data.shortest_side and data.cell_diameter:
        crop = min(crop, _multiple_of_16(data.shortest_side * base_diameter / data.cell_diameter))
    folds = min(data.images, MAX_FOLDS) if 2 <= data.images <= FOLDS_UP_TO_IMAGES else 0
    return {
        "scale": "cells",
        "cell_diameter": base_diameter,
        "epochs": epochs,
        "epoch_size": CROPS_PER_EPOCH,
        "lr": FINETUNE_LR,
        "warmup": 0.1,
        "crop": crop,
        "folds": folds,
        "val_every": epochs,  # a fold validates once, at its end: its held-out images choose nothing
        "unlabelled_edges": True,
    }


def _multiple_of_16(pixels: float) -> int:
    return 16 * math.ceil(pixels / 16)


def plan_for(config: TrainConfig, given: set[str], label_images: list[Any]) -> TrainConfig:
    """`config` with the fine-tuning defaults for every planned option the command line did not give."""
    base_diameter = config.cell_diameter if "cell_diameter" in given else trained_cell_diameter(config.init)
    data = LabelledSet.of(label_images)
    plan = {k: v for k, v in finetune_plan(base_diameter, data, config.batch_size).items() if k not in given}
    log.info(
        "fine-tuning %s on %d images, %d cells (median diameter %.1f px): %s",
        config.init,
        data.images,
        data.cells,
        data.cell_diameter,
        ", ".join(f"{k}={v}" for k, v in plan.items()),
    )
    return replace(config, **plan)


def trained_cell_diameter(model_folder: str) -> float:
    """The median diameter, in pixels at the model's scale, of the cells a model was trained on (its card)."""
    card = read_card(_folder_of(model_folder))
    diameter = card.training.data.cell_diameter if card.training else 0.0
    if diameter <= 0:
        raise CheckpointError(
            f"{model_folder}'s model.json does not record the size of the cells it was trained on "
            "(training.data.cell_diameter); give --cell-diameter, in pixels at the model's scale"
        )
    return diameter


def _folder_of(init: str) -> Path:
    path = Path(init)
    return path.parent if path.suffix == ".pt" else path

"""Score a predictor on labelled images with the competition metric, overall and per cell type.

Used by validation during training and by the `evaluate` entrypoint, so both report the same number.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from app.ml.celltypes import CellTypeClassifier, image_contrast, map_features
from app.ml.data.kaggle import Sample
from app.ml.options import Mode
from app.ml.postprocess import InstanceConfig
from app.ml.rules import InstanceRules
from app.ml.scoring.metric import THRESHOLDS, score_per_threshold
from app.ml.serving.predictor import Predictor


@dataclass
class Evaluation:
    """The competition score of a set of images, with its parts."""

    score: float
    per_cell_type: dict[str, float]
    per_threshold: dict[str, float]
    images: int
    cells: int
    predicted_cells: int
    per_image: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def instance_step_maps(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """(H, W) image -> the (2, H, W) maps the instance step reads, in the service's default mode (auto: resize for
    images of the size the model was trained for, tile at the trained pixel scale for crops such as held-out rows
    and for large images)."""
    return predictor.predict_maps(image, Mode.AUTO)


def evaluate(predictor: Predictor, samples: Iterable[Sample], rules: InstanceRules | None = None) -> Evaluation:
    """Run every sample through the predictor and score it."""
    scored = [(sample, instance_step_maps(predictor, sample.image)) for sample in samples]
    return score_maps(scored, rules or predictor.rules)


def score_maps(scored: list[tuple[Sample, np.ndarray]], rules: InstanceRules) -> Evaluation:
    """(sample, instance step maps) pairs -> Evaluation with the given instance step."""
    rows, by_type = [], defaultdict(list)
    for sample, maps in scored:
        instances = rules.find(maps, image_contrast(sample.image))
        per_threshold = score_per_threshold(sample.labels, instances.labels)
        rows.append((sample, per_threshold, instances))
        by_type[sample.cell_type].append(per_threshold.mean())
    if not rows:
        raise ValueError("nothing to evaluate: the set of images is empty")
    table = np.stack([r[1] for r in rows])
    return Evaluation(
        score=float(table.mean()),
        per_cell_type={k: float(np.mean(v)) for k, v in sorted(by_type.items())},
        per_threshold={f"{t:.2f}": float(v) for t, v in zip(THRESHOLDS, table.mean(axis=0), strict=True)},
        images=len(rows),
        cells=int(sum(int(s.labels.max()) for s, _, _ in rows)),
        predicted_cells=int(sum(found.count for _, _, found in rows)),
        per_image=[
            {
                "id": s.image_id,
                "cell_type": s.cell_type,
                "score": float(t.mean()),
                "cells": int(s.labels.max()),
                "predicted": found.count,
                "predicted_cell_type": found.cell_type,
            }
            for s, t, found in rows
        ],
    )


# Searched in rounds: the two probability thresholds together, then the smallest cell at the best pair, then the
# smallest seed (a larger one merges the fragments a thin cell's interior breaks into).
THRESHOLD_GRID = {
    "foreground_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "seed_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
}
ONE_AT_A_TIME = {
    "min_cell_area": (24, 64, 128, 256, 512, 1024, 2048),
    "min_seed_area": (2, 4, 8, 12, 16, 24, 32, 48, 64),
}


def tune_thresholds(scored: list[tuple[Sample, np.ndarray]], base: InstanceConfig) -> tuple[InstanceConfig, float]:
    """Search THRESHOLD_GRID, then each of ONE_AT_A_TIME in turn, on already computed instance step maps; the best
    config and its score (the config a round starts from wins ties)."""
    candidates = [
        base.with_overrides(foreground_threshold=foreground, seed_threshold=seed)
        for foreground, seed in itertools.product(*THRESHOLD_GRID.values())
    ]
    best = _best(scored, [base, *candidates])
    for name, values in ONE_AT_A_TIME.items():
        best = _best(scored, [best[0], *(best[0].with_overrides(**{name: value}) for value in values)])
    return best


def _features(rules: InstanceRules, sample: Sample, maps: np.ndarray) -> np.ndarray:
    return map_features(maps, image_contrast(sample.image), rules.default)


def _best(scored: list[tuple[Sample, np.ndarray]], configs: list[InstanceConfig]) -> tuple[InstanceConfig, float]:
    scores = [score_maps(scored, InstanceRules(config)).score for config in configs]
    index = int(np.argmax(scores))  # the first of equal scores
    return configs[index], scores[index]


def tune_rules(
    train: list[tuple[Sample, np.ndarray]], validation: list[tuple[Sample, np.ndarray]], base: InstanceConfig
) -> tuple[InstanceRules, Evaluation]:
    """The whole instance step, chosen by measurement:

    1. default thresholds: the best on all validation images;
    2. the cell-type classifier: fitted on the training images' maps under the default thresholds;
    3. per cell type, thresholds of its own where they beat the default on that type's validation images.
    Returns the rules and their evaluation on validation, cell types picked by the classifier as in serving.
    """
    default, _ = tune_thresholds(validation, base)
    rules = InstanceRules(default)
    types = sorted({sample.cell_type for sample, _ in train + validation})
    if len(types) > 1:
        features = np.stack([_features(rules, sample, maps) for sample, maps in train])
        rules = InstanceRules(default, {}, CellTypeClassifier.fit(features, [s.cell_type for s, _ in train]))
        for cell_type in types:
            of_type = [(s, p) for s, p in validation if s.cell_type == cell_type]
            if not of_type:
                continue
            config, _ = tune_thresholds(of_type, default)
            if config != default:  # the default wins ties, so another config scored strictly higher
                rules = rules.for_cell_type(cell_type, config)
    return rules, score_maps(validation, rules)

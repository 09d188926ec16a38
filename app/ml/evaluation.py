"""Score a predictor on labelled images with the competition metric, overall and per cell type.

Used by validation during training and by the `evaluate` entrypoint, so both report the same number.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from app.ml.kaggle import Sample
from app.ml.metrics import THRESHOLDS, score_per_threshold
from app.ml.postprocess import InstanceConfig, probabilities_to_instances
from app.ml.predictor import Mode, Predictor
from app.ml.transforms import PreprocessConfig, scaled_size


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


def evaluation_mode(shape: tuple[int, int], preprocess: PreprocessConfig) -> Mode:
    """Resize mode (the service's default) for images of the size the model was trained for; otherwise, for crops
    such as held-out rows, tile mode, which sees them at the same pixel scale."""
    side = preprocess.input_size
    return Mode.RESIZE if scaled_size(shape, preprocess.pixel_scale) == (side, side) else Mode.TILE


def probabilities(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """(H, W) image -> (C, H, W) probabilities through the mode the evaluation uses."""
    return predictor.predict_probabilities(image, evaluation_mode(image.shape, predictor.preprocess))


def evaluate(predictor: Predictor, samples: Iterable[Sample], config: InstanceConfig | None = None) -> Evaluation:
    """Run every sample through the predictor and score it."""
    config = config or predictor.instances
    scored = [(sample, probabilities(predictor, sample.image)) for sample in samples]
    return score_probabilities(scored, config)


def score_probabilities(scored: list[tuple[Sample, np.ndarray]], config: InstanceConfig) -> Evaluation:
    """(sample, probabilities) pairs -> Evaluation with the given instance thresholds."""
    rows, by_type = [], defaultdict(list)
    for sample, probs in scored:
        instances = probabilities_to_instances(probs, config)
        per_threshold = score_per_threshold(sample.labels, instances.labels)
        rows.append((sample, per_threshold, instances.count))
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
        predicted_cells=int(sum(n for _, _, n in rows)),
        per_image=[
            {
                "id": s.image_id,
                "cell_type": s.cell_type,
                "score": float(t.mean()),
                "cells": int(s.labels.max()),
                "predicted": n,
            }
            for s, t, n in rows
        ],
    )


def tune_thresholds(scored: list[tuple[Sample, np.ndarray]], base: InstanceConfig) -> tuple[InstanceConfig, Evaluation]:
    """Grid-search foreground and seed thresholds on already computed probabilities; the best config wins."""
    best: tuple[InstanceConfig, Evaluation] | None = None
    for foreground, seed in itertools.product((0.3, 0.4, 0.5, 0.6, 0.7), (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)):
        config = base.with_overrides(foreground_threshold=foreground, seed_threshold=seed)
        result = score_probabilities(scored, config)
        if best is None or result.score > best[1].score:
            best = (config, result)
    assert best is not None
    return best

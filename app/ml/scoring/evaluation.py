"""Score a predictor on labelled images with the competition metric, overall and per cell type.

Used by validation during training and by the `evaluate` entrypoint, so both report the same number.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from app.ml.celltypes import image_contrast
from app.ml.data.kaggle import Sample
from app.ml.options import Mode
from app.ml.rules import InstanceRules
from app.ml.scoring.metric import THRESHOLDS, score_per_threshold, seg_jaccards
from app.ml.serving.predictor import Predictor


@dataclass
class Evaluation:
    """The competition score of a set of images, with its parts, and the Cell Tracking Challenge's SEG measure
    (the mean over labelled cells of their Jaccard index with the predicted cell covering most of them)."""

    score: float
    per_cell_type: dict[str, float]
    per_threshold: dict[str, float]
    images: int
    cells: int
    predicted_cells: int
    seg: float = 0.0
    seg_per_cell_type: dict[str, float] = field(default_factory=dict)
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
    rows, by_type, seg_by_type = [], defaultdict(list), defaultdict(list)
    for sample, maps in scored:
        instances = rules.find(maps, image_contrast(sample.image))
        per_threshold = score_per_threshold(sample.labels, instances.labels)
        jaccards = seg_jaccards(sample.labels, instances.labels)
        rows.append((sample, per_threshold, jaccards, instances))
        by_type[sample.cell_type].append(per_threshold.mean())
        seg_by_type[sample.cell_type].append(jaccards)
    if not rows:
        raise ValueError("nothing to evaluate: the set of images is empty")
    table = np.stack([r[1] for r in rows])
    return Evaluation(
        score=float(table.mean()),
        per_cell_type={k: float(np.mean(v)) for k, v in sorted(by_type.items())},
        per_threshold={f"{t:.2f}": float(v) for t, v in zip(THRESHOLDS, table.mean(axis=0), strict=True)},
        images=len(rows),
        cells=int(sum(int(s.labels.max()) for s, *_ in rows)),
        predicted_cells=int(sum(found.count for *_, found in rows)),
        seg=_mean_over_cells([r[2] for r in rows]),
        seg_per_cell_type={k: _mean_over_cells(v) for k, v in sorted(seg_by_type.items())},
        per_image=[
            {
                "id": s.image_id,
                "cell_type": s.cell_type,
                "score": float(t.mean()),
                "seg": _mean_over_cells([j]),
                "cells": int(s.labels.max()),
                "predicted": found.count,
                "predicted_cell_type": found.cell_type,
            }
            for s, t, j, found in rows
        ],
    )


def _mean_over_cells(jaccards: list[np.ndarray]) -> float:
    """SEG of a set of images: every labelled cell counts once (0 where none is labelled)."""
    joined = np.concatenate(jaccards) if jaccards else np.zeros(0)
    return float(joined.mean()) if joined.size else 0.0

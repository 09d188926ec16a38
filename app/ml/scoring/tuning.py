"""Choosing a model's instance step by measurement: thresholds (default and per cell type) and the cell-type
classifier, on maps the network has already computed."""

from __future__ import annotations

import itertools
import logging
from functools import partial

import numpy as np
from tqdm import tqdm

from app.ml.celltypes import CellTypeClassifier, image_contrast, map_features
from app.ml.data.kaggle import Sample
from app.ml.postprocess import InstanceConfig
from app.ml.rules import InstanceRules
from app.ml.scoring.evaluation import Evaluation, instance_step_maps, score_maps
from app.ml.serving.predictor import Predictor

log = logging.getLogger("cellseg.tune")
Scored = list[tuple[Sample, np.ndarray]]  # labelled images with the instance step's maps of each


def tune_model(
    predictor: Predictor, train: list[Sample], validation: list[Sample]
) -> tuple[InstanceRules, Evaluation, Scored]:
    """tune_rules for a trained model: its maps of both sets, then the chosen rules, their evaluation on
    validation, and the validation maps (for overlays)."""
    bar = partial(tqdm, unit="img", leave=False)
    train_scored = [(s, instance_step_maps(predictor, s.image)) for s in bar(train, desc="tune: training images")]
    val_scored = [(s, instance_step_maps(predictor, s.image)) for s in bar(validation, desc="tune: validation images")]
    rules, evaluation = tune_rules(train_scored, val_scored, InstanceConfig())
    log.info(
        "instance step chosen on validation: %s -> score %.4f %s",
        rules.to_dict(),
        evaluation.score,
        evaluation.per_cell_type,
    )
    return rules, evaluation, val_scored


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


def tune_thresholds(scored: Scored, base: InstanceConfig) -> tuple[InstanceConfig, float]:
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


def _best(scored: Scored, configs: list[InstanceConfig]) -> tuple[InstanceConfig, float]:
    scores = [score_maps(scored, InstanceRules(config)).score for config in configs]
    index = int(np.argmax(scores))  # the first of equal scores
    return configs[index], scores[index]


def tune_rules(train: Scored, validation: Scored, base: InstanceConfig) -> tuple[InstanceRules, Evaluation]:
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

"""k-fold cross-validation (`train --folds K`): every image is scored by a model that never trained on it.

Each fold trains with the run's options on the images of the other folds and computes the instance step's maps of
its own; the instance step (thresholds, and the cell-type classifier where there are several types) is chosen on
those out-of-fold maps, which score it; then one model trains on every image, and its card records that step and
that score (kind "out-of-fold"). The fold models stay in <run>/folds/ for a look.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from app.ml.card import ModelCard
from app.ml.data.labelled import LabelledFolders
from app.ml.data.split import Split
from app.ml.postprocess import InstanceConfig
from app.ml.scoring.evaluation import Evaluation, score_maps
from app.ml.scoring.tuning import Scored, tune_rules
from app.ml.training.config import TrainConfig
from app.ml.training.trainer import ChosenStep, Trainer

log = logging.getLogger("cellseg.train")


class Record(Protocol):
    image_id: str
    sample_id: str
    cell_type: str


def fold_splits(records: Sequence[Record], folds: int, seed: int) -> list[Split]:
    """`folds` splits whose validation parts are disjoint and cover every image, whole samples (sample_id) at a
    time, each cell type's samples dealt round the folds in a shuffled order (so each fold holds some of every type
    it can). Same seed, same folds."""
    type_of = {r.sample_id: r.cell_type for r in records}
    if not 2 <= folds <= len(type_of):
        raise ValueError(f"--folds {folds}: cross-validation needs between 2 and {len(type_of)} (the samples) folds")
    rng = np.random.default_rng(seed)
    fold_of, dealt = {}, 0
    for cell_type in sorted(set(type_of.values())):
        of_type = sorted(s for s, t in type_of.items() if t == cell_type)
        for index in rng.permutation(len(of_type)):
            fold_of[of_type[index]] = dealt % folds
            dealt += 1
    ids = [(r.image_id, fold_of[r.sample_id]) for r in records]
    return [
        Split("sample", [i for i, f in ids if f != fold], [i for i, f in ids if f == fold]) for fold in range(folds)
    ]


def cross_validate(config: TrainConfig, dataset: LabelledFolders) -> ModelCard:
    """Train config.folds fold models, choose the instance step on their out-of-fold maps, then train the model
    kept on every image; returns its card."""
    records = dataset.records
    splits = fold_splits(records, config.folds, config.seed)
    run = f"{config.out}/{config.version}"
    held_out: list[Scored] = []  # each fold's images with the maps of the fold model that never trained on them
    started = time.monotonic()
    for number, split in enumerate(splits, start=1):
        fold = replace(
            config,
            out=f"{run}/folds",
            version=f"fold-{number}",
            folds=0,
            tune_thresholds=False,
            set_default=False,
            val_every=config.epochs,
        )
        _log_time_left(number, len(splits) + 1, started)
        trainer = Trainer(fold, split=split, progress_label=f"fold {number}/{len(splits)}", dataset=dataset)
        trainer.fit()
        held_out.append(trainer.last_scored)
    scored = [pair for part in held_out for pair in part]
    rules, evaluation = tune_rules(scored, scored, InstanceConfig())
    per_fold = [fold_figures(score_maps(part, rules)) for part in held_out]
    log.info(
        "cross-validation, %d folds: out-of-fold score %.4f (folds %s), SEG %.4f %s",
        len(splits),
        evaluation.score,
        " ".join(f"{fold['score']:.3f}" for fold in per_fold),
        evaluation.seg,
        evaluation.per_cell_type,
    )
    _log_time_left(len(splits) + 1, len(splits) + 1, started)
    every_image = Split("all", [r.image_id for r in records], [])
    final = replace(config, folds=0, val_every=config.epochs)
    trainer = Trainer(
        final,
        split=every_image,
        chosen=ChosenStep(rules, evaluation, scored, {"folds": per_fold, "spread_across_folds": spread(per_fold)}),
        progress_label=f"{config.version} (every image)",
        dataset=dataset,
    )
    card = trainer.fit()
    assert card is not None  # one process: cross-validation does not run under torchrun
    return card


def fold_figures(evaluation: Evaluation) -> dict[str, Any]:
    """What the card keeps of one fold's held-out images, scored with the instance step chosen on all folds."""
    keep = ("images", "score", "seg", "per_cell_type", "seg_per_cell_type")
    return {key: value for key, value in evaluation.to_dict().items() if key in keep}


def spread(per_fold: list[dict[str, Any]]) -> dict[str, float]:
    """The standard deviation across folds of the score and of SEG."""
    return {f"{name}_std": float(np.std([fold[name] for fold in per_fold])) for name in ("score", "seg")}


def _log_time_left(run: int, runs: int, started: float) -> None:
    """A line per run of the cross-validation, with the time left estimated from the runs so far."""
    done = run - 1
    if done == 0:
        log.info("cross-validation: run %d of %d", run, runs)
        return
    left = (time.monotonic() - started) / done * (runs - done)
    log.info("cross-validation: run %d of %d, about %.0f min left", run, runs, left / 60)

"""The out-of-fold maps of a cross-validated model (`train --folds K`): each image through the fold model that never
trained on it, so `evaluate` and `tune` score and choose on the same maps train chose on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from app.ml.checkpoint import MODEL_JSON, read_card
from app.ml.data.split import Split, load_split
from app.ml.errors import CellSegError
from app.ml.scoring.evaluation import instance_step_maps
from app.ml.scoring.tuning import Scored
from app.ml.serving.predictor import Predictor

FOLDS_FOLDER = "folds"


def fold_folders(model_folder: Path) -> list[Path]:
    """The fold models a cross-validated run left in its folder, in order."""
    folds = model_folder / FOLDS_FOLDER
    found = sorted(folds.glob("fold-*"), key=lambda p: int(p.name.removeprefix("fold-"))) if folds.is_dir() else []
    return [folder for folder in found if (folder / MODEL_JSON).is_file()]


def out_of_fold_maps(model_folder: Path, dataset, predictor_for: Callable[[Path], Predictor]) -> Scored:
    """Every image of `dataset` that a fold held out, with the instance step's maps of that fold's model."""
    folders = fold_folders(model_folder)
    if not folders:
        raise CellSegError(f"{model_folder} was trained on every image and keeps no fold models in {FOLDS_FOLDER}/")
    present, scored = set(dataset.image_ids), []
    for folder in folders:
        recorded = Split.from_dict(read_card(folder).split or {})
        held_out = [i for i in recorded.val_ids if i in present]
        predictor = predictor_for(folder)
        _, samples = load_split(dataset, Split(recorded.kind, held_out, held_out))
        scored += [(s, instance_step_maps(predictor, s.image)) for s in tqdm(samples, desc=folder.name, leave=False)]
    if not scored:
        raise CellSegError(f"none of the images {model_folder}'s folds held out are in {dataset.root}")
    return scored

"""`tune`: choose a trained model's instance step again on its own split, and write it into its model.json.

The thresholds (default and per cell type) are chosen on the validation images; the cell-type classifier is
fitted on the training images. For a cross-validated model (`train --folds K`), both are chosen on its fold models'
out-of-fold maps, as train chose them. `train` does the same at its end; this reruns it for a model already trained.
With --tta 2, 4 or 8 they are chosen on the maps averaged over that many views and kept beside the others, for the
service and the CLIs to use when they run with that many views. Without --cell-type, the folders' cells are of
the cell type the model was trained with (`train --cell-type`, else each folder's name).

Examples:
  tune --model model_store/unet-20261127-101500 --data /data/sartorius-reconstructed /data/sartorius
  tune --model model_store/unet-20261127-101500 --data /data/sartorius-reconstructed /data/sartorius --tta 4
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from app.cli import DATA_HELP, add_data_argument, add_model_arguments, model_folder, predictor_from_args, setup_logging
from app.ml.card import ModelCard
from app.ml.checkpoint import load_checkpoint, save_checkpoint
from app.ml.data.labelled import open_labelled
from app.ml.data.split import Split, cross_validated, load_split
from app.ml.errors import CellSegError
from app.ml.postprocess import InstanceConfig
from app.ml.rules import InstanceRules
from app.ml.scoring.evaluation import Evaluation
from app.ml.scoring.folds import out_of_fold_maps
from app.ml.scoring.tuning import tune_model, tune_rules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, scoring=True)
    add_data_argument(parser, f"the folders the model was trained on: {DATA_HELP}")
    return parser


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        checkpoint = load_checkpoint(model_folder(args))
        if checkpoint.split is None:
            raise CellSegError(f"{checkpoint.path}: model.json records no split to tune on")
        # The cell type the model was trained with, unless given: its thresholds and classifier are per type.
        trained_as = checkpoint.card.training.args.get("cell_type") if checkpoint.card.training else None
        dataset = open_labelled(args.data, args.cell_type or trained_as)
        if cross_validated(checkpoint.split):  # chosen again on the folds' out-of-fold maps, as train chose it
            scored = out_of_fold_maps(checkpoint.path, dataset, lambda fold: predictor_from_args(args, fold))
            rules, evaluation = tune_rules(scored, scored, InstanceConfig())
        else:
            train, validation = load_split(dataset, Split.from_dict(checkpoint.split))
            rules, evaluation, _ = tune_model(predictor_from_args(args, checkpoint), train, validation)
    except (CellSegError, KeyError) as exc:
        print(f"tune: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    save_checkpoint(checkpoint.path, checkpoint.state_dict, with_rules(checkpoint.card, args.tta, rules, evaluation))
    print(json.dumps({"version": checkpoint.version, "tta": args.tta, "validation": evaluation.score,
                      "per_cell_type": evaluation.per_cell_type}))  # fmt: skip


def with_rules(card: ModelCard, tta: int, rules: InstanceRules, evaluation: Evaluation) -> ModelCard:
    """The card with `rules` as its instance step for `tta` views, and their validation figures: without test-time
    augmentation its instance step and "validation"; with, postprocessing_by_tta and "validation_tta_<views>"."""
    figures = {"kind": "out-of-fold" if cross_validated(card.split) else "held-out", **evaluation.to_dict()}
    if tta == 1:
        return replace(card, postprocessing=rules, metrics={**card.metrics, "validation": figures})
    return replace(
        card,
        postprocessing_by_tta={**card.postprocessing_by_tta, tta: rules},
        metrics={**card.metrics, f"validation_tta_{tta}": figures},
    )


if __name__ == "__main__":
    main()

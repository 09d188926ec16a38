"""`tune`: choose a trained model's instance step again on its own split, and write it into its model.json.

The thresholds (default and per cell type) are chosen on the validation images; the cell-type classifier is
fitted on the training images. `train` does the same at its end; this reruns it for a model already trained.
With --tta 2, 4 or 8 they are chosen on the maps averaged over that many views and kept beside the others, for the
service and the CLIs to use when they run with that many views.

Examples:
  tune --model model_store/unet-20261127-101500 --data /data/sartorius-reconstructed /data/sartorius
  tune --model model_store/unet-20261127-101500 --data /data/sartorius-reconstructed /data/sartorius --tta 4
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from app.cli import add_data_argument, add_model_arguments, model_folder, predictor_from_args, setup_logging
from app.ml.card import ModelCard
from app.ml.checkpoint import load_checkpoint, save_checkpoint
from app.ml.data.kaggle import KaggleFolders
from app.ml.errors import CellSegError
from app.ml.rules import InstanceRules
from app.ml.scoring.evaluation import Evaluation
from app.ml.training.trainer import tune_model
from app.ml.training.trainset import Split, load_split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, scoring=True)
    add_data_argument(parser, "the Kaggle-layout folders the model was trained on")
    return parser


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        checkpoint = load_checkpoint(model_folder(args))
        if checkpoint.split is None:
            raise CellSegError(f"{checkpoint.path}: model.json records no split to tune on")
        train, validation = load_split(KaggleFolders(args.data), Split.from_dict(checkpoint.split))
        predictor = predictor_from_args(args, checkpoint)
        rules, evaluation, _ = tune_model(predictor, train, validation)
    except (CellSegError, KeyError) as exc:
        print(f"tune: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    save_checkpoint(checkpoint.path, checkpoint.state_dict, with_rules(checkpoint.card, args.tta, rules, evaluation))
    print(json.dumps({"version": checkpoint.version, "tta": args.tta, "validation": evaluation.score,
                      "per_cell_type": evaluation.per_cell_type}))  # fmt: skip


def with_rules(card: ModelCard, tta: int, rules: InstanceRules, evaluation: Evaluation) -> ModelCard:
    """The card with `rules` as its instance step for `tta` views, and their validation figures: without test-time
    augmentation its instance step and "validation"; with, postprocessing_by_tta and "validation_tta_<views>"."""
    if tta == 1:
        return replace(card, postprocessing=rules, metrics={**card.metrics, "validation": evaluation.to_dict()})
    return replace(
        card,
        postprocessing_by_tta={**card.postprocessing_by_tta, tta: rules},
        metrics={**card.metrics, f"validation_tta_{tta}": evaluation.to_dict()},
    )


if __name__ == "__main__":
    main()

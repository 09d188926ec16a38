"""`tune`: choose a trained model's instance step again on its own split, and write it into its model.json.

The thresholds (default and per cell type) are chosen on the validation images; the cell-type classifier is
fitted on the training images. `train` does the same at its end; this reruns it for a model already trained.

Example:
  tune --model model_store/unet-20261127-101500 --data /data/sartorius-reconstructed /data/sartorius
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from app.cli import add_data_argument, add_model_arguments, model_folder, predictor_from_args, setup_logging
from app.ml.checkpoint import load_checkpoint, save_checkpoint
from app.ml.data.kaggle import KaggleFolders
from app.ml.errors import CellSegError
from app.ml.training.trainer import tune_model
from app.ml.training.trainset import Split, load_split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
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
    metrics = {**checkpoint.card.metrics, "validation": evaluation.to_dict()}
    card = replace(checkpoint.card, postprocessing=rules, metrics=metrics)
    save_checkpoint(checkpoint.path, checkpoint.state_dict, card)
    print(json.dumps({"version": checkpoint.version, "validation": evaluation.score,
                      "per_cell_type": evaluation.per_cell_type}))  # fmt: skip


if __name__ == "__main__":
    main()

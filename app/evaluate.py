"""`evaluate`: score a checkpoint on labelled folders with the competition metric, per cell type.

Examples:
  evaluate --model model_store/default-v1 --data /data/sartorius                      # every image
  evaluate --model model_store/default-v1 --data /data/sartorius --subset validation  # its own validation split
  evaluate --model model_store/default-v1 --data /data/lab-u373 --cell-type u373      # a lab's CTC folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from app.cli import DATA_HELP, add_data_argument, add_model_arguments, model_folder, predictor_from_args, setup_logging
from app.ml.checkpoint import load_checkpoint
from app.ml.data.kaggle import Sample
from app.ml.data.labelled import LabelledFolders, open_labelled
from app.ml.data.split import Split, cross_validated, load_split
from app.ml.errors import CellSegError
from app.ml.scoring.evaluation import Evaluation, instance_step_maps, score_maps
from app.ml.scoring.folds import out_of_fold_maps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, scoring=True)
    add_data_argument(parser, DATA_HELP)
    parser.add_argument(
        "--subset",
        choices=["all", "validation"],
        default="all",
        help="'all' images, or the 'validation' part recorded in the model's model.json: its held-out images, or for "
        "a cross-validated model every image through the fold model that held it out (default: all)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the full result (per image too) as JSON")
    return parser


def select_samples(dataset: LabelledFolders, split: dict | None, subset: str) -> list[Sample]:
    """All samples, or the model's validation part of them (whole images, or held-out bottom rows)."""
    if subset == "all":
        return list(tqdm(dataset, total=len(dataset), desc="load", unit="img", leave=False))
    if split is None:
        raise CellSegError("this model's model.json records no split; use --subset all")
    recorded = Split.from_dict(split)
    present = set(dataset.image_ids)
    ids = [i for i in recorded.val_ids if i in present]
    if not ids:
        raise CellSegError(f"none of the model's validation images {recorded.val_ids[:5]} are in {dataset.root}")
    return load_split(dataset, Split(recorded.kind, ids, ids, recorded.holdout_rows))[1]


def report(evaluation: Evaluation) -> str:
    lines = [
        f"score {evaluation.score:.4f} on {evaluation.images} image(s), {evaluation.cells} cells "
        f"({evaluation.predicted_cells} predicted)"
    ]
    lines += [
        f"  {cell_type:<10} {score:.4f}  SEG {evaluation.seg_per_cell_type[cell_type]:.4f}"
        for cell_type, score in evaluation.per_cell_type.items()
    ]
    lines.append(f"  SEG (Cell Tracking Challenge, mean Jaccard over labelled cells) {evaluation.seg:.4f}")
    lines.append("  per IoU threshold: " + " ".join(f"{t}:{v:.3f}" for t, v in evaluation.per_threshold.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        checkpoint = load_checkpoint(model_folder(args))
        predictor = predictor_from_args(args, checkpoint)
        dataset = open_labelled(args.data, args.cell_type)
        if args.subset == "validation" and cross_validated(checkpoint.split):
            # Its validation figure is out of fold: each image through the fold model that never trained on it.
            scored = out_of_fold_maps(checkpoint.path, dataset, lambda fold: predictor_from_args(args, fold))
        else:
            samples = select_samples(dataset, checkpoint.split, args.subset)
            scored = [(s, instance_step_maps(predictor, s.image)) for s in tqdm(samples, desc="evaluate", unit="img")]
        evaluation = score_maps(scored, predictor.rules)
    except CellSegError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    how = [predictor.precision] + ["compiled"] * predictor.compiled + [f"tta {args.tta}"] * (args.tta > 1)
    print(f"model {checkpoint.version}, subset {args.subset}, " + ", ".join(how))
    print(report(evaluation))
    if args.json:
        with Path(args.json).open("w") as handle:
            json.dump({"model": checkpoint.version, "subset": args.subset, **evaluation.to_dict()}, handle, indent=2)


if __name__ == "__main__":
    main()

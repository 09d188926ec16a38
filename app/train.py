"""`train`: turn labelled folders (Kaggle's train.csv, label images, CTC, COCO, GeoJSON, ROI sets) into a served
checkpoint in model_store/.

Examples:
  train --data /data/sartorius --epochs 60                      # one GPU, or the CPU
  train --data /data/plate1 /data/plate2                         # several folders, one dataset
  torchrun --nproc_per_node 4 -m app.train --data /data/sartorius  # data-parallel on 4 GPUs
  train --resume model_store/unet-20261127-101500                  # continue a killed run
  train --init model_store/sartorius-w16-v3 --data my-cells --version my-cells-v1   # teach it a lab's cells

With --init, the options a fine-tuning run needs (working scale, schedule, cross-validation) default to what suits
a lab's few labelled images; docs/finetune.md explains them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from app.cli import CELL_TYPE_HELP, DATA_HELP, setup_logging
from app.ml.card import ModelCard
from app.ml.data.labelled import open_labelled
from app.ml.errors import CellSegError
from app.ml.training.config import SCALES, TrainConfig
from app.ml.training.finetune import plan_for
from app.ml.training.folds import cross_validate
from app.ml.training.run_files import load_resume_state
from app.ml.training.trainer import Trainer

HELP = {
    "data": f"one or more {DATA_HELP}",
    "out": "model store to write the run folder <out>/<version>/ into",
    "version": "name of the run folder (default: unet-<UTC timestamp>)",
    "seed": "seed of the split, the initial weights, and every crop and augmentation",
    "epochs": "number of epochs",
    "epoch_size": "crops per epoch (default 0: one per training image)",
    "batch_size": "crops per optimizer step in each process (under torchrun the global batch is this x processes)",
    "lr": "peak learning rate of AdamW (linear warm-up, then cosine decay to 0)",
    "weight_decay": "AdamW weight decay",
    "warmup": "fraction of all steps spent warming the learning rate up",
    "width": "channels of the first U-Net level (the paper: 64); doubled at each level down",
    "depth": "number of 2x2 poolings (the paper: 4)",
    "paper": "use the paper's unpadded convolutions (572 in -> 388 out; overlap-tile always)",
    "input_size": "side that resize mode scales every image to (the paper: 572)",
    "scale": "'resize': train at the pixel scale the service's resize mode gives images of --reference-size; "
    "'native': train at the images' own pixels (for tile mode); 'cells': rescale the images so that the labelled "
    "cells' median diameter becomes --cell-diameter (the default with --init)",
    "cell_diameter": "with --scale cells: the median cell diameter to train at, in pixels at the network's scale "
    "(default with --init: the one the --init model was trained at, from its model.json)",
    "unlabelled_edges": "labels may leave out the cells cut by the image's edge: background within half a cell of "
    "the edge is not taught (the default with --init)",
    "folds": "k-fold cross-validation: K fold models each score the images the others train on, the instance step "
    "is chosen on those out-of-fold maps, then one model trains on every image (0: a held-out split; default with "
    "--init and up to 20 images: leave-one-out up to 5 images, else 5 folds)",
    "reference_size": "HEIGHTxWIDTH of the images the service will resize (default: the first image's size); "
    "e.g. 520x704 when training on crops of competition images",
    "tile_size": "network input side in tile mode",
    "border_width": "pixels of a cell's edge that form the border class",
    "w0": "weight map: w0 of the separation term w0 exp(-(d1+d2)^2 / 2 sigma^2)",
    "sigma": "weight map: sigma in pixels",
    "dice_weight": "weight of an extra soft-Dice term on the foreground (0: off)",
    "centre": "also predict each cell's centre map (distance to its edge) and seed the watershed from it",
    "centre_weight": "weight of the centre map's binary cross-entropy in the loss",
    "crop": "side of the random training crops",
    "elastic_std": "standard deviation in pixels of the elastic deformation on a 3x3 grid (0: off)",
    "augment": "flips, 90-degree turns, elastic deformation, brightness/contrast/noise",
    "val_fraction": "fraction of each cell type's sample_ids held out for validation (whole samples, never split)",
    "holdout_rows": "instead of a split by sample: validate on this bottom fraction of every image",
    "val_every": "validate every N epochs (and after the last)",
    "tune_thresholds": "after training, choose the instance thresholds that score best on validation",
    "device": "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'",
    "amp": "mixed precision: 'auto' (on for CUDA and for CPUs that compute bfloat16 natively), 'on' or 'off'",
    "workers": "DataLoader worker processes",
    "torch_threads": "torch CPU threads (0: torch's default), as the service's CELLSEG_TORCH_THREADS",
    "checkpoint_every": "also save the resume state every N steps (it is always saved after each epoch)",
    "set_default": "make this run the store's default model (model_store/DEFAULT)",
    "oversample": "draw the training images of these cell types more often, e.g. 'astro=3' (each round of an epoch "
    "draws every astrocyte image 3 times, every other image once)",
    "init": "start from these weights instead of random ones (same architecture): a model folder, or a run's "
    "RUN_FOLDER/last.pt (where its schedule ended); for fine-tuning, or a second schedule after a run",
    "cell_type": CELL_TYPE_HELP,
}


def build_parser(given_only: bool = False) -> argparse.ArgumentParser:
    """train's options; `given_only`: none has a default, so the parsed arguments are those the command gave."""
    parser = argparse.ArgumentParser(
        prog="train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = TrainConfig(data=[])
    for item in fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        default = argparse.SUPPRESS if given_only else getattr(defaults, item.name)
        if item.name == "data":
            parser.add_argument(flag, nargs="+", default=default, metavar="FOLDER", help=HELP[item.name])
            continue
        kind = type(getattr(defaults, item.name))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[item.name])
            continue
        choices = {"scale": list(SCALES), "amp": ["auto", "on", "off"]}.get(item.name)
        parser.add_argument(
            flag, type=kind, default=default, choices=choices, help=f"{HELP[item.name]} (default: %(default)r)"
        )
    parser.add_argument(
        "--resume", metavar="RUN_FOLDER", help="continue a killed run from RUN_FOLDER/last.pt with its saved options"
    )
    parser.add_argument(
        "--finetune-defaults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --init, default the options that suit fine-tuning on a few images (docs/finetune.md)",
    )
    return parser


def run(config: TrainConfig, given: set[str], finetune_defaults: bool) -> ModelCard | None:
    """A run as the options say: fine-tuning defaults where asked for, then cross-validation or one run."""
    dataset = open_labelled(config.data, config.cell_type or None)
    if config.init and finetune_defaults:
        config = plan_for(config, given, [sample.labels for sample in dataset])
    if config.folds:
        return cross_validate(config, dataset)
    return Trainer(config, dataset=dataset).fit()


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            config, saved = load_resume_state(args.resume)
            card = Trainer(config, resume_state=saved).fit()
        else:
            if not args.data:
                raise SystemExit("train: --data is required (one or more folders of labelled images)")
            given = set(vars(build_parser(given_only=True).parse_args(argv)))
            values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
            card = run(TrainConfig(**values), given, args.finetune_defaults)
    except (CellSegError, FileNotFoundError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if card is not None:
        validation = card.metrics["validation"]
        summary = {
            "version": card.version,
            "validation": card.validation_score,
            "validation_kind": validation.get("kind", "held-out"),
            "seg": validation.get("seg"),
            "per_cell_type": validation["per_cell_type"],
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

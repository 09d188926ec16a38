"""`train`: turn labelled folders (Kaggle's train.csv, label images, CTC, COCO, GeoJSON, ROI sets) into a served
checkpoint in model_store/.

Examples:
  train --data /data/sartorius --epochs 60                      # one GPU, or the CPU
  train --data /data/plate1 /data/plate2                         # several folders, one dataset
  torchrun --nproc_per_node 4 -m app.train --data /data/sartorius  # data-parallel on 4 GPUs
  train --resume model_store/unet-20261127-101500                  # continue a killed run
  train --data /data/lab-u373 --cell-type u373 --init model_store/sartorius-w16-v3  # a lab's cells, fine-tuned
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from app.cli import CELL_TYPE_HELP, DATA_HELP, setup_logging
from app.ml.errors import CellSegError
from app.ml.training.trainer import TrainConfig, Trainer, load_resume_state

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
    "'native': train at the images' own pixels (for tile mode)",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = TrainConfig(data=[])
    for item in fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        if item.name == "data":
            parser.add_argument(flag, nargs="+", default=[], metavar="FOLDER", help=HELP[item.name])
            continue
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[item.name])
            continue
        choices = {"scale": ["resize", "native"], "amp": ["auto", "on", "off"]}.get(item.name)
        parser.add_argument(
            flag, type=type(default), default=default, choices=choices, help=f"{HELP[item.name]} (default: {default!r})"
        )
    parser.add_argument(
        "--resume", metavar="RUN_FOLDER", help="continue a killed run from RUN_FOLDER/last.pt with its saved options"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            config, saved = load_resume_state(args.resume)
            card = Trainer(config, resume_state=saved).fit()
        else:
            if not args.data:
                raise SystemExit("train: --data is required (labelled folders: train --help says which layouts)")
            values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
            card = Trainer(TrainConfig(**values)).fit()
    except (CellSegError, FileNotFoundError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if card is not None:
        summary = {
            "version": card.version,
            "validation": card.validation_score,
            "per_cell_type": card.metrics["validation"]["per_cell_type"],
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

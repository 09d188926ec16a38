"""Small pieces shared by the command-line entrypoints."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
from pathlib import Path

from app.config import Settings
from app.ml.checkpoint import Checkpoint, resolve_model_folder
from app.ml.options import OPTION_NAMES, TTA_CHOICES, InferenceOptions
from app.ml.serving.predictor import Predictor

# The inference settings the entrypoints share with the service: one name and one default each, the service's.
_SETTINGS = Settings.model_fields


def add_model_arguments(parser: argparse.ArgumentParser, scoring: bool = False) -> None:
    """--model, --model-store and the inference settings (each named and defaulted as the service's CELLSEG_*).

    A scoring entrypoint (`scoring`: evaluate, tune) computes in float32 unless told otherwise, as `train` validates:
    its scores and choices are then the model's, the same on every machine and equal to those its card records;
    --half-precision scores the model in the reduced precision a GPU or a CPU with native bfloat16 serves it in.
    """
    parser.add_argument("--model", help="a model folder such as model_store/<version> (default: the store's default)")
    parser.add_argument("--model-store", default="model_store", help="store to pick the default model from")
    for name in OPTION_NAMES:
        field = _SETTINGS[name]
        flag = "--" + name.replace("_", "-")
        text = f"{field.description} (CELLSEG_{name.upper()}; default: %(default)s)"
        if field.annotation is bool:
            default = field.default
            if name == "half_precision" and scoring:
                default, text = False, f"{field.description} (default here: float32, as train validates)"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif name in ("backend", "steps_on_device"):
            choices = [option.value for option in type(field.default)]
            parser.add_argument(flag, choices=choices, default=field.default.value, help=text)
        elif name == "tta":
            parser.add_argument(flag, type=int, choices=TTA_CHOICES, default=field.default, help=text)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help=text)


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The inference settings of add_model_arguments' arguments, as one object."""
    return InferenceOptions(**{name: getattr(args, name) for name in OPTION_NAMES})


def predictor_from_args(args: argparse.Namespace, source: Checkpoint | Path | None = None) -> Predictor:
    """The predictor the inference settings in `args` describe, warmed up (and so compiled) when compiling."""
    predictor = Predictor.from_checkpoint(source or model_folder(args), inference_options(args))
    if predictor.options.compile:
        predictor.warm_up()
    return predictor


DATA_HELP = (
    "labelled folders, each in its layout: Kaggle (train.csv + train/<id>.png), label image pairs (NAME.tif + "
    "NAME_masks.tif; images/ + masks/), Cell Tracking Challenge (01/ + 01_GT/SEG/), COCO JSON, QuPath GeoJSON or a "
    "Fiji ROI set per image (NAME.geojson, NAME.zip), or the service's own output files"
)
CELL_TYPE_HELP = (
    "the cell type of every cell in the --data folders (default: each folder's name); Kaggle folders keep their "
    "train.csv's cell_type column"
)


def add_data_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--data FOLDER ... and --cell-type NAME (the cell type of the folders' cells; Kaggle folders name their own)."""
    parser.add_argument("--data", nargs="+", required=True, metavar="FOLDER", help=help_text)
    parser.add_argument("--cell-type", metavar="NAME", help=CELL_TYPE_HELP)


def model_folder(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else resolve_model_folder(args.model_store)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# glibc's mallopt parameters (malloc.h), each with the environment variable that sets it at start-up instead.
_MALLOC_SETTINGS = {
    "MALLOC_ARENA_MAX": (-8, 2),
    "MALLOC_MMAP_THRESHOLD_": (-3, 32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": (-1, 1024 * 1024 * 1024),
}


def tune_malloc() -> None:
    """Set glibc's malloc for a server that allocates the same large arrays on every request, except where
    a MALLOC_* environment variable already says otherwise. A no-op where the C library is not glibc.

    - 2 arenas: glibc gives threads that allocate at the same time arenas of their own (up to 8 per core) and
      keeps freed memory in each, so with the service's worker threads resident memory crept up request after
      request; with 2 it stays level.
    - Blocks up to 32 MiB (glibc's maximum) from the heap, kept there when freed (trim threshold 1 GiB):
      otherwise each request maps fresh pages for the network's activations (a 576x576x16 float32 map is
      21 MiB) and the arrays around them, and pays a page fault for each 4 KiB page it touches. Resident memory
      is a little higher, and level. docs/performance.md has the measurements.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for variable, (parameter, value) in _MALLOC_SETTINGS.items():
        if variable not in os.environ:
            mallopt(parameter, value)


def tune_malloc_of_children() -> None:
    """The same malloc settings for the processes this one starts (server workers): glibc reads them from the
    environment at start-up, where one was not already given."""
    for variable, (_, value) in _MALLOC_SETTINGS.items():
        os.environ.setdefault(variable, str(value))

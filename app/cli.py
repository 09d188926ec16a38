"""Small pieces shared by the command-line entrypoints."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
from pathlib import Path

from app.ml.checkpoint import resolve_model_folder


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model folder such as model_store/<version> (default: the store's default)")
    parser.add_argument("--model-store", default="model_store", help="store to pick the default model from")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    parser.add_argument(
        "--tta",
        type=int,
        choices=[1, 4, 8],
        default=1,
        help="test-time augmentation: the mean over 1 (off), 4 (flips) or 8 (flips and turns) views of each "
        "network input; costs that many network passes (default: 1)",
    )


def add_data_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="FOLDER", help=help_text)


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
      keeps freed memory in each, so with the service's worker threads resident memory crept up for hundreds of
      requests; with 2 it stays level.
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

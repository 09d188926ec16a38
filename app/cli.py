"""Small pieces shared by the command-line entrypoints."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from app.ml.checkpoint import resolve_model_folder


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model folder such as model_store/<version> (default: the store's default)")
    parser.add_argument("--model-store", default="model_store", help="store to pick the default model from")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")


def model_folder(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else resolve_model_folder(args.model_store)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

"""Shared fixtures: the real Sartorius sample beside the project, and synthetic data in the Kaggle layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from app.ml.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL_STORE = REPO / "model_store"  # its DEFAULT names the shipped model
SARTORIUS = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO.parent / "shared" / "data" / "sartorius"))


@pytest.fixture(scope="session")
def sartorius() -> Path:
    """The real competition sample; its absence is an error, not a skip."""
    assert (SARTORIUS / "train.csv").is_file(), f"real sample not found at {SARTORIUS}; set CELLSEG_SHARED_DATA"
    return SARTORIUS


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 128x160 synthetic images (three sample_ids per cell type pair) in the Kaggle layout."""
    return write_dataset(tmp_path_factory.mktemp("synth"), images=6, height=128, width=160, seed=7)


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """(H, W) bool disk, for hand-made test scenes."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


@pytest.fixture(scope="session")
def synth_train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve 256x256 synthetic images (six samples of two images) to train on."""
    return write_dataset(tmp_path_factory.mktemp("synth-train"), images=12, height=256, width=256, seed=1)


@pytest.fixture(scope="session")
def trained_model(synth_train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small U-Net trained by our own `train` for about a minute on synthetic data: a real checkpoint."""
    from app.train import main as train  # noqa: PLC0415 - imported where the fixture runs

    store = tmp_path_factory.mktemp("model_store")
    train([
        "--data", str(synth_train_data), "--out", str(store), "--version", "synth-v1", "--set-default",
        "--epochs", "24", "--epoch-size", "64", "--batch-size", "8", "--crop", "128",
        "--width", "8", "--depth", "3", "--input-size", "256", "--tile-size", "256",
        "--val-fraction", "0.34", "--val-every", "4", "--threads", "2",
    ])  # fmt: skip
    return store / "synth-v1"

"""Shared fixtures: the real Sartorius sample beside the project, and synthetic data in the Kaggle layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from app.ml.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
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

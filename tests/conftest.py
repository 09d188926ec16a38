"""Shared fixtures: the real Sartorius sample beside the project, and synthetic data in the Kaggle layout."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.ml.data.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL_STORE = REPO / "model_store"  # its DEFAULT names the shipped model
SHARED_DATA = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
SARTORIUS = SHARED_DATA / "sartorius"
RECONSTRUCTED = SHARED_DATA / "sartorius-reconstructed"
LAB_U373 = SHARED_DATA / "lab-u373"  # Cell Tracking Challenge layout
LAB_HELA = SHARED_DATA / "lab-hela"  # Cellpose's NAME.tif + NAME_masks.tif


def shared_folder(folder: Path, marker: str = "train.csv") -> Path:
    """A folder of the real data beside the project, found by a file it holds (`marker`). Without it the test is
    skipped, saying how to get it, except in CI (CI=true), which has it and must run every test."""
    if not (folder / marker).is_file():
        message = (
            f"real data not found at {folder}: put the project's shared/data folder beside the "
            "checkout (../shared/data) or point CELLSEG_SHARED_DATA at a copy of it"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def shared_lab_folder(folder: Path) -> Path:
    """A lab's labelled folder in ../shared/data (no train.csv: found by its README.md), as shared_folder."""
    return shared_folder(folder, "README.md")


@pytest.fixture(scope="session")
def sartorius() -> Path:
    """The real competition sample: the left 448 columns of one SH-SY5Y training image, and 3 test images."""
    return shared_folder(SARTORIUS)


@pytest.fixture(scope="session")
def reconstructed() -> Path:
    """43 labelled competition training images of all three cell types."""
    return shared_folder(RECONSTRUCTED)


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
    """Eighteen 256x256 synthetic images (nine samples of two images, three of each cell type) to train on."""
    return write_dataset(tmp_path_factory.mktemp("synth-train"), images=18, height=256, width=256, seed=1)


@pytest.fixture(scope="session")
def trained_model(synth_train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small U-Net trained by our own `train` on synthetic data of three cell types: a real checkpoint, with its
    thresholds (per cell type where they win) and the cell-type classifier."""
    from app.train import main as train  # noqa: PLC0415 - imported where the fixture runs

    store = tmp_path_factory.mktemp("model_store")
    train([
        "--data", str(synth_train_data), "--out", str(store), "--version", "synth-v1", "--set-default",
        "--epochs", "24", "--epoch-size", "64", "--batch-size", "8", "--crop", "128",
        "--width", "8", "--depth", "3", "--input-size", "256", "--tile-size", "256",
        "--val-fraction", "0.34", "--val-every", "4", "--torch-threads", "2",
    ])  # fmt: skip
    return store / "synth-v1"


def nginx_binary() -> str:
    """nginx on PATH or in /usr/sbin (often not on a user's PATH); skipped without it, except in CI."""
    found = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found:
        return found
    message = "nginx not found (PATH, /usr/sbin): install it, e.g. `apt-get install -y nginx-light` on Debian"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def started_nginx(conf: Path, prefix: Path, port: int, access_log: Path | None = None) -> Iterator[Path]:
    """A real nginx with `conf` (prefix `prefix`), listening on 127.0.0.1:`port`: yields its error log (stderr), and
    its access log goes to `access_log` (stdout) where given; stopped gracefully (SIGQUIT) after."""
    log = prefix / "error.log"
    command = [nginx_binary(), "-e", "stderr", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
    with log.open("w") as errors, (access_log or log).open("a") as requests:
        process = subprocess.Popen(command, stdout=requests, stderr=errors)
    try:
        wait_until_nginx_listens(process, port, log)
        yield log
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_nginx_listens(process: subprocess.Popen, port: int, log: Path, seconds: float = 10.0) -> None:
    """Return once the nginx just started listens on 127.0.0.1:`port`; fail with its error log if it exits first or
    takes longer than `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"nginx exited with code {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert time.monotonic() < deadline, f"nginx did not listen within {seconds:.0f} s:\n{log.read_text()}"
        time.sleep(0.05)

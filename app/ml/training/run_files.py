"""The files of one training run in model_store/<version>/, each written atomically by rank 0 only:

model.json + weights (the model as validated so far: servable at any moment), last.pt (everything --resume needs),
metrics.jsonl (every step and every validation), split.json, curves.png and overlays.png.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

import app
from app.ml.card import ModelCard
from app.ml.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    remove_temp_files,
    save_checkpoint,
    set_default_version,
)
from app.ml.errors import CheckpointError
from app.ml.training.config import TrainConfig
from app.ml.training.plots import save_curves, save_overlays
from app.ml.unet import UNetConfig

STATE_FILE = "last.pt"
METRICS_FILE = "metrics.jsonl"
Overlay = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # image id, image, true labels, predicted labels


class RunFiles:
    """Writes a run's folder; every method is a no-op outside the main process."""

    def __init__(self, folder: Path, is_main: bool = True) -> None:
        self.folder, self.is_main = folder, is_main

    def start(self, split: dict[str, Any], history: list[dict]) -> None:
        """Create the folder, record the split, and keep the metrics a resumed run has replayed up to."""
        if not self.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.folder)  # a run killed inside an atomic write leaves its temp file behind
        atomic_write_json(self.folder / "split.json", split)
        # A resumed run replays from its saved step: later lines of the killed run are dropped.
        kept = [json.dumps(h) + "\n" for h in history]
        atomic_write_bytes(self.folder / METRICS_FILE, "".join(kept).encode())

    def log(self, record: dict) -> None:
        if self.is_main:
            with (self.folder / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def save_curves(self, history: list[dict]) -> None:
        if self.is_main:
            save_curves(history, self.folder / "curves.png")

    def save_state(self, state: dict[str, Any]) -> None:
        """last.pt: tensors and JSON strings only, so --resume reads it without executing pickled code."""
        if not self.is_main:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.folder / STATE_FILE, buffer.getvalue())

    def save_model(
        self, weights: dict[str, torch.Tensor], card: ModelCard, overlays: list[Overlay], store_default: str = ""
    ) -> ModelCard:
        """The servable model (weights + model.json, checked by sha256 on load) and its overlays; `store_default`
        names the store whose DEFAULT becomes this version."""
        card = save_checkpoint(self.folder, weights, card)
        save_overlays(overlays, self.folder / "overlays.png")
        if store_default:
            set_default_version(store_default, card.version)
        return card


def load_resume_state(folder: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """Read last.pt of a run folder without executing pickled code (weights_only)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --resume takes a run folder such as model_store/<version>")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return TrainConfig.from_dict(json.loads(saved["config"])), saved


def initial_weights(source: str, architecture: UNetConfig) -> dict[str, torch.Tensor]:
    """The weights to start from (--init): a model folder's, or a run's last weights (its last.pt, which holds
    where its schedule ended rather than its best validation). Their architecture must be the one asked for."""
    if Path(source).name == STATE_FILE:
        config, saved = load_resume_state(Path(source).parent)
        found, weights = config.architecture(), saved["model"]
    else:
        checkpoint = load_checkpoint(source)
        found, weights = checkpoint.architecture, checkpoint.state_dict
    if found != architecture:
        raise CheckpointError(
            f"--init {source} is a {found} but this run trains a {architecture}: "
            "give the same --width, --depth, --paper and --centre"
        )
    return weights


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{app.__version__}+{commit}" if commit else app.__version__

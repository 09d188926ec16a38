"""Pictures a person can look at: training curves and validation overlays (matplotlib, no screen needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files, never to a window

import matplotlib.pyplot as plt
import numpy as np

from app.ml.checkpoint import atomic_write_bytes
from app.ml.outputs import overlay


def save_curves(history: list[dict], path: Path) -> None:
    """Training loss per step and validation score per evaluation, side by side."""
    train = [h for h in history if h["kind"] == "train"]
    val = [h for h in history if h["kind"] == "val"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([h["step"] for h in train], [h["loss"] for h in train], lw=0.8)
    left.set(xlabel="step", ylabel="weighted cross-entropy", title="training loss", yscale="log")
    right.plot([h["step"] for h in val], [h["score"] for h in val], "o-", label="all", color="black")
    for cell_type in sorted({t for h in val for t in h.get("per_cell_type", {})}):
        right.plot([h["step"] for h in val], [h["per_cell_type"].get(cell_type) for h in val], ".--", label=cell_type)
    right.set(xlabel="step", ylabel="competition score", title="validation", ylim=(0, 1))
    right.legend(loc="upper left")
    _save(fig, path)


def save_overlays(examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """Rows of (name, image, truth labels, predicted labels) -> image | truth | prediction."""
    aspect = max(e[1].shape[0] / e[1].shape[1] for e in examples)  # rows as tall as the images need
    fig, axes = plt.subplots(len(examples), 3, figsize=(15, (5 * aspect + 0.5) * len(examples)), squeeze=False)
    for row, (name, image, truth, pred) in zip(axes, examples, strict=True):
        panels = [
            (image, f"{name}: image"),
            (overlay(image, truth), f"truth ({truth.max()} cells)"),
            (overlay(image, pred), f"prediction ({pred.max()} cells)"),
        ]
        for ax, (picture, title) in zip(row, panels, strict=True):
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1) if picture.ndim == 2 else ax.imshow(picture)
            ax.set_title(title)
            ax.axis("off")
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())

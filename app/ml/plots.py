"""Pictures a person can look at: training curves and validation overlays (matplotlib, no screen needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files, never to a window

import matplotlib.pyplot as plt
import numpy as np
from skimage.segmentation import find_boundaries

from app.ml.checkpoint import atomic_write_bytes


def contour_overlay(image: np.ndarray, labels: np.ndarray, color: tuple[int, int, int] = (255, 64, 0)) -> np.ndarray:
    """(H, W) float image in [0, 1] and (H, W) labels -> (H, W, 3) uint8 with every cell's outline drawn."""
    gray = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[find_boundaries(labels, mode="inner")] = color
    return rgb


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
    fig, axes = plt.subplots(len(examples), 3, figsize=(15, 4.5 * len(examples)), squeeze=False)
    for row, (name, image, truth, pred) in zip(axes, examples, strict=True):
        panels = [
            (image, f"{name}: image"),
            (contour_overlay(image, truth, (0, 200, 0)), f"truth ({truth.max()})"),
            (contour_overlay(image, pred), f"prediction ({pred.max()})"),
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

"""Label maps -> PNG bytes: 16-bit instance labels, a 0/255 mask, or an overlay for a person to look at."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from app.ml.errors import InvalidOptionError

_GOLDEN = 0.618033988749895


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    """(H, W) uint8/uint16 or (H, W, 3) uint8 -> PNG. Level 1: large images encode fast and still shrink well."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def label_png(labels: np.ndarray) -> bytes:
    """(H, W) labels -> 16-bit grayscale PNG: 0 = background, 1..N = cells."""
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise InvalidOptionError("more than 65535 cells do not fit a 16-bit PNG; ask for format=json")
    return png_bytes(labels.astype(np.uint16))


def mask_png(labels: np.ndarray) -> bytes:
    """(H, W) labels -> 8-bit PNG: 255 where any cell is, 0 elsewhere."""
    return png_bytes(np.where(labels > 0, 255, 0).astype(np.uint8))


def cell_colors(count: int) -> np.ndarray:
    """(count + 1, 3) uint8: black for background, then well-separated bright hues (golden-ratio steps)."""
    hues = (np.arange(count) * _GOLDEN) % 1.0
    sextant = hues * 6.0
    rgb = np.clip(np.stack([np.abs(sextant - 3) - 1, 2 - np.abs(sextant - 2), 2 - np.abs(sextant - 4)], axis=1), 0, 1)
    colors = (rgb * 200 + 55).astype(np.uint8)
    return np.vstack([np.zeros((1, 3), np.uint8), colors])


def overlay(image: np.ndarray, labels: np.ndarray, fill: float = 0.25) -> np.ndarray:
    """(H, W) float image in [0, 1] + labels -> (H, W, 3) uint8: each cell tinted and outlined in its own colour."""
    gray = np.repeat(np.clip(image, 0.0, 1.0)[..., None] * 255.0, 3, axis=-1)
    colors = cell_colors(int(labels.max(initial=0))).astype(np.float32)[labels]
    cells = (labels > 0)[..., None]
    blended = np.where(cells, gray * (1 - fill) + colors * fill, gray)
    edges = find_boundaries(labels, mode="inner")
    blended[edges] = colors[edges]
    return np.rint(blended).astype(np.uint8)


def overlay_png(image: np.ndarray, labels: np.ndarray) -> bytes:
    return png_bytes(overlay(image, labels))

"""Run-length encoding in the Kaggle Sartorius convention.

A mask is written as space-separated `start length` pairs. Starts are 1-indexed and pixels are numbered
row-major (index = row * width + col + 1), which is what the competition's files really use.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from app.ml.errors import InvalidRLEError


def encode(mask: np.ndarray) -> str:
    """(H, W) bool -> 'start length ...' (empty string for an empty mask)."""
    runs = label_runs(np.asarray(mask, dtype=bool).astype(np.uint8))
    return "".join(encode_runs(runs))  # the runs of label 1, or no string at all for an empty mask


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """'start length ...' -> (H, W) bool. Raises InvalidRLEError naming the problem; never clips."""
    starts, lengths = parse(rle, shape)
    size = shape[0] * shape[1]
    # Mark run boundaries with +1/-1 and integrate: one vectorized pass whatever the number of runs.
    steps = np.zeros(size + 1, dtype=np.int8)
    steps[starts - 1] += 1
    steps[starts - 1 + lengths] -= 1
    return np.cumsum(steps[:-1], dtype=np.int8).astype(bool).reshape(shape)


def parse(rle: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate an RLE string against an image shape -> (1-indexed starts, lengths) as int64 arrays."""
    values = _parse_integers(rle)
    if values.size % 2:
        raise InvalidRLEError(f"RLE has an odd number of values ({values.size}); it must be 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    _check_runs(starts, lengths, shape[0] * shape[1])
    return starts, lengths


class LabelRuns(NamedTuple):
    """Every run of every non-zero label of an (H, W) map, row-major, grouped by label and in pixel order within
    each: label k = labels[k] owns runs bounds[k]:bounds[k + 1] of starts (0-indexed) and lengths."""

    labels: np.ndarray
    bounds: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def label_runs(labels: np.ndarray) -> LabelRuns:
    """(H, W) int label map (0 = background) -> its LabelRuns, in one pass over the image."""
    flat = np.asarray(labels).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(starts, append=flat.size)
    values = flat[starts]
    keep = values != 0
    # A stable sort groups each label's runs while keeping them in pixel order.
    order = np.argsort(values[keep], kind="stable")
    starts, lengths, values = starts[keep][order], lengths[keep][order], values[keep][order]
    first = np.flatnonzero(np.diff(values, prepend=0))
    return LabelRuns(values[first], np.append(first, values.size), starts, lengths)


def encode_labels(labels: np.ndarray) -> dict[int, str]:
    """(H, W) int label map (0 = background) -> {label: rle} for every label present."""
    runs = label_runs(labels)
    return dict(zip(runs.labels.tolist(), encode_runs(runs), strict=True))


def encode_runs(runs: LabelRuns) -> list[str]:
    """LabelRuns -> one RLE string per label, in the order of runs.labels."""
    # Every number is turned into text in one go; each label then joins its own slice of the words.
    words = list(map(str, np.column_stack((runs.starts + 1, runs.lengths)).ravel().tolist()))
    edges = (runs.bounds * 2).tolist()
    return [" ".join(words[a:b]) for a, b in itertools.pairwise(edges)]


def bounding_boxes(runs: LabelRuns, width: int) -> np.ndarray:
    """LabelRuns of a map `width` pixels wide -> (K, 4) int64 [x, y, width, height] per label, from the runs alone.

    A run that wraps from one row's end into the next covers both the last and the first column.
    """
    ends = runs.starts + runs.lengths - 1
    first_row, last_row = runs.starts // width, ends // width
    wraps = last_row > first_row
    first_col = np.where(wraps, 0, runs.starts % width)
    last_col = np.where(wraps, width - 1, ends % width)
    at = runs.bounds[:-1]
    top, bottom = np.minimum.reduceat(first_row, at), np.maximum.reduceat(last_row, at)
    left, right = np.minimum.reduceat(first_col, at), np.maximum.reduceat(last_col, at)
    return np.column_stack((left, top, right - left + 1, bottom - top + 1))


def _parse_integers(rle: str) -> np.ndarray:
    tokens = rle.split()
    bad = [t for t in tokens if not t.isascii() or not t.lstrip("-").isdigit()]
    if bad:
        raise InvalidRLEError(f"RLE contains non-integer values, e.g. {bad[0]!r}; it must be integers only")
    # No image has 10^18 pixels; below that, a start plus a length cannot overflow int64 either.
    huge = [t for t in tokens if len(t.lstrip("-")) > 18]
    if huge:
        raise InvalidRLEError(f"RLE contains a value of {len(huge[0])} digits; no image has that many pixels")
    return np.array(tokens, dtype=np.int64) if tokens else np.zeros(0, dtype=np.int64)


def _check_runs(starts: np.ndarray, lengths: np.ndarray, size: int) -> None:
    if (lengths <= 0).any():
        i = int(np.flatnonzero(lengths <= 0)[0])
        raise InvalidRLEError(f"RLE run {i + 1} has length {lengths[i]}; lengths must be at least 1")
    if (starts < 1).any():
        i = int(np.flatnonzero(starts < 1)[0])
        raise InvalidRLEError(f"RLE run {i + 1} starts at {starts[i]}; starts are 1-indexed")
    ends = starts + lengths - 1
    if (ends > size).any():
        i = int(np.flatnonzero(ends > size)[0])
        raise InvalidRLEError(
            f"RLE run {i + 1} ends at pixel {ends[i]}, past the image's {size} pixels; check width and height"
        )
    if starts.size > 1 and (starts[1:] <= ends[:-1]).any():
        i = int(np.flatnonzero(starts[1:] <= ends[:-1])[0]) + 1
        raise InvalidRLEError(
            f"RLE run {i + 1} starts at {starts[i]}, not after the previous run's end {ends[i - 1]}; "
            "runs must be in increasing order without overlap"
        )

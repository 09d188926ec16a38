"""Synthetic phase-contrast images with their cells, written in exactly the Kaggle layout.

Three shape families stand in for the competition's cell types: round "cort"-like cells, elongated "shsy5y"-like
cells with thin processes, and large irregular "astro"-like cells. Many cells are placed touching a neighbour;
each is drawn with a dark body, a bright halo outside its edge and a faint bright rim, over uneven illumination
and noise, as phase contrast shows them. Fast enough for tests and CI to train and serve on.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from app.ml import rle
from app.ml.data.kaggle import CSV_COLUMNS
from app.ml.imageio import to_uint8

CELL_TYPES = ("shsy5y", "astro", "cort")


@dataclass(frozen=True)
class SynthImage:
    """(H, W) float32 image in [0, 1], (H, W) int32 labels 1..N, the image's cell type."""

    image: np.ndarray
    labels: np.ndarray
    cell_type: str


def generate_image(
    rng: np.random.Generator, height: int, width: int, cell_type: str, density: float = 1.0
) -> SynthImage:
    """One synthetic image of `cell_type`; `density` scales the number of cells."""
    labels = _place_cells(rng, (height, width), cell_type, density)
    image = _render(rng, labels)
    return SynthImage(image=image, labels=labels, cell_type=cell_type)


def write_dataset(
    out: str | Path, images: int = 8, height: int = 256, width: int = 256, seed: int = 0, density: float = 1.0
) -> Path:
    """Write `images` synthetic images to out/train/<id>.png and their cells to out/train.csv."""
    root = Path(out)
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str | int]] = []
    for index in range(images):
        cell_type = CELL_TYPES[(index // 2) % len(CELL_TYPES)]
        synth = generate_image(rng, height, width, cell_type, density)
        image_id = f"synth{seed:04d}{index:05d}"
        Image.fromarray(to_uint8(synth.image)).save(root / "train" / f"{image_id}.png")
        rows += _csv_rows(image_id, synth, sample=index // 2)
    _write_csv(root / "train.csv", rows)
    return root


def _csv_rows(image_id: str, synth: SynthImage, sample: int) -> list[dict[str, str | int]]:
    height, width = synth.labels.shape
    meta = {
        "width": width,
        "height": height,
        "cell_type": synth.cell_type,
        "plate_time": "12h00m00s",
        "sample_date": "2020-01-01",
        # Two images per sample, so a split by sample_id really has to keep pairs together.
        "sample_id": f"synth-{sample}",
        "elapsed_timedelta": "0 days 12:00:00",
    }
    encoded = rle.encode_labels(synth.labels)
    return [{"id": image_id, "annotation": encoded[label], **meta} for label in sorted(encoded)]


def _write_csv(path: Path, rows: list[dict[str, str | int]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


# ---------------------------------------------------------------- shapes


def _shape_mask(rng: np.random.Generator, cell_type: str) -> np.ndarray:
    """A random cell shape of the given family as a small bool patch."""
    if cell_type == "cort":
        return _blob(rng, radius=rng.uniform(5, 9), aspect=rng.uniform(1.0, 1.6), wobble=0.12)
    if cell_type == "astro":
        return _blob(rng, radius=rng.uniform(14, 24), aspect=rng.uniform(1.0, 2.0), wobble=0.35)
    body = _blob(rng, radius=rng.uniform(6, 10), aspect=rng.uniform(1.8, 3.2), wobble=0.1)
    return _with_processes(rng, body, count=int(rng.integers(0, 3)))


def _blob(rng: np.random.Generator, radius: float, aspect: float, wobble: float) -> np.ndarray:
    """A rotated ellipse whose radius varies smoothly with angle (low harmonics)."""
    half = int(np.ceil(radius * aspect * (1 + wobble))) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    theta = np.arctan2(v, u)
    bumps = sum(rng.uniform(-wobble, wobble) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    r = np.sqrt((u / aspect) ** 2 + v**2)
    return r <= radius * (1 + bumps)


def _with_processes(rng: np.random.Generator, body: np.ndarray, count: int) -> np.ndarray:
    """Add thin straight processes (neurites) leaving the body's centre."""
    if count == 0:
        return body
    length = int(rng.uniform(12, 26))
    canvas = np.pad(body, length)
    centre = np.array(canvas.shape) // 2
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        steps = np.arange(length + body.shape[0] // 2)
        rows = np.clip((centre[0] + steps * np.sin(angle)).astype(int), 0, canvas.shape[0] - 1)
        cols = np.clip((centre[1] + steps * np.cos(angle)).astype(int), 0, canvas.shape[1] - 1)
        canvas[rows, cols] = True
    return ndimage.binary_dilation(canvas, iterations=2) | np.pad(body, length)


# ---------------------------------------------------------------- placement


def _place_cells(rng: np.random.Generator, shape: tuple[int, int], cell_type: str, density: float) -> np.ndarray:
    """Draw cells into a label map; a new cell takes only free pixels, so earlier cells keep their shape."""
    labels = np.zeros(shape, dtype=np.int32)
    mean_area = {"cort": 180.0, "shsy5y": 330.0, "astro": 1300.0}[cell_type]
    target = max(1, int(density * 0.3 * shape[0] * shape[1] / mean_area))
    centres: list[tuple[int, int]] = []
    for _ in range(target * 3):
        if labels.max() >= target:
            break
        mask = _shape_mask(rng, cell_type)
        centre = _next_centre(rng, shape, centres, mask.shape[0] // 2)
        if _paint(labels, mask, centre, int(labels.max()) + 1):
            centres.append(centre)
    return labels


def _next_centre(
    rng: np.random.Generator, shape: tuple[int, int], centres: list[tuple[int, int]], reach: int
) -> tuple[int, int]:
    """Half the cells start right beside an earlier one, so many touch; the rest anywhere."""
    if centres and rng.random() < 0.5:
        row, col = centres[int(rng.integers(len(centres)))]
        angle = rng.uniform(0, 2 * np.pi)
        distance = reach * rng.uniform(0.9, 1.4)
        return int(row + distance * np.sin(angle)), int(col + distance * np.cos(angle))
    return int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))


def _paint(labels: np.ndarray, mask: np.ndarray, centre: tuple[int, int], label: int) -> bool:
    """Paint `mask` centred at `centre` onto free pixels; refuse cells mostly hidden or mostly off the image."""
    top, left = centre[0] - mask.shape[0] // 2, centre[1] - mask.shape[1] // 2
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + mask.shape[0], labels.shape[0]), min(left + mask.shape[1], labels.shape[1])
    if r1 <= r0 or c1 <= c0:
        return False
    patch = mask[r0 - top : r1 - top, c0 - left : c1 - left]
    # Opening removes thin necks where a later cell squeezes past earlier ones: real cells do not have them.
    free = ndimage.binary_opening(patch & (labels[r0:r1, c0:c1] == 0), iterations=2)
    visible, _ = ndimage.label(free)
    if visible.max() == 0:
        return False
    largest = visible == np.argmax(np.bincount(visible.ravel())[1:]) + 1
    if largest.sum() < 0.6 * mask.sum() or largest.sum() < 12:
        return False
    labels[r0:r1, c0:c1][largest] = label
    return True


# ---------------------------------------------------------------- rendering


def _render(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Labels -> a phase-contrast-like (H, W) float32 image in [0, 1]."""
    cells = labels > 0
    body_tone = rng.uniform(-0.18, -0.05, size=int(labels.max()) + 1).astype(np.float32)
    body_tone[0] = 0.0
    image = 0.5 + body_tone[labels]
    image += 0.05 * _smooth_noise(rng, labels.shape, sigma=2.0) * cells
    outside = ndimage.binary_dilation(cells, iterations=3) & ~cells
    image += 0.22 * ndimage.gaussian_filter(outside.astype(np.float32), 1.2)
    image += 0.08 * _rims(labels)
    image = ndimage.gaussian_filter(image, 0.8)
    image *= _illumination(rng, labels.shape)
    image += rng.normal(0.0, 0.025, size=labels.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _rims(labels: np.ndarray) -> np.ndarray:
    """1 on the one-pixel inner edge of every cell (where two cells touch, a thin bright seam shows)."""
    edge = ndimage.maximum_filter(labels, 3) != ndimage.minimum_filter(labels, 3)
    return (edge & (labels > 0)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A smooth multiplicative gradient of +-15 %, like an unevenly lit phase-contrast field."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    gy, gx = rng.uniform(-0.15, 0.15, size=2)
    return 1.0 + gy * (yy / shape[0] - 0.5) + gx * (xx / shape[1] - 0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write train.csv and train/<id>.png into")
    parser.add_argument("--images", type=int, default=8, help="number of images (default: 8)")
    parser.add_argument("--height", type=int, default=256, help="image height in pixels (default: 256)")
    parser.add_argument("--width", type=int, default=256, help="image width in pixels (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data")
    parser.add_argument("--density", type=float, default=1.0, help="scales the number of cells (default: 1.0)")
    args = parser.parse_args(argv)
    root = write_dataset(args.out, args.images, args.height, args.width, args.seed, args.density)
    print(f"wrote {args.images} images to {root}")


if __name__ == "__main__":
    main()

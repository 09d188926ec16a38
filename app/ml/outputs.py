"""Found cells -> every output format: the service's answers, `predict`'s files and the pictures in docs/.

- json: one record per cell (id, Kaggle RLE from app.ml.rle, area, bbox, score);
- png (16-bit labels), mask (0/255) and overlay (an RGB picture for a person);
- the files lab tools open: a label TIFF (Fiji; a stack's frames as its pages), an ImageJ ROI set (Fiji's ROI
  Manager), GeoJSON (QuPath) and COCO instance annotations with compressed RLE (pycocotools).

Outlines (ROI set, GeoJSON) are traced on each cell's own mask (marching squares, at pixel edges), the cell's
largest outline kept; holes are not outlined, so a polygon covers its cell and, where the cell has a hole, the hole
too.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any

import numpy as np
import roifile
import tifffile
from PIL import Image
from pycocotools import mask as coco_mask
from scipy import ndimage
from skimage import measure

from app.ml import rle, stopping
from app.ml.errors import InvalidOptionError
from app.ml.imageio import to_uint8
from app.ml.postprocess import Instances


class OutputFormat(StrEnum):
    """json: per-cell RLE; png: 16-bit label image; mask: 0/255 image; overlay: RGB picture of the cells; tiff:
    label TIFF (Fiji); roi: ImageJ ROI set (zip); geojson: cell polygons (QuPath); coco: COCO annotations with
    compressed RLE (pycocotools)."""

    JSON = "json"
    PNG = "png"
    MASK = "mask"
    OVERLAY = "overlay"
    TIFF = "tiff"
    ROI = "roi"
    GEOJSON = "geojson"
    COCO = "coco"

    @property
    def media_type(self) -> str:
        return _FILES[self][0]

    @property
    def file_suffix(self) -> str:
        """How the name of a file of this format ends, for files written per image (predict --formats)."""
        return _FILES[self][1]


_FILES = {  # format -> (media type, file name ending)
    OutputFormat.JSON: ("application/json", ".json"),
    OutputFormat.PNG: ("image/png", "-labels.png"),
    OutputFormat.MASK: ("image/png", "-mask.png"),
    OutputFormat.OVERLAY: ("image/png", "-overlay.png"),
    OutputFormat.TIFF: ("image/tiff", "-labels.tif"),
    OutputFormat.ROI: ("application/zip", "-rois.zip"),
    OutputFormat.GEOJSON: ("application/geo+json", ".geojson"),
    OutputFormat.COCO: ("application/json", "-coco.json"),
}
STACK_FORMATS = frozenset({OutputFormat.JSON, OutputFormat.TIFF})  # the formats that carry every frame of a stack


def encode(output: OutputFormat, image: np.ndarray, instances: Instances) -> list[dict[str, Any]] | bytes:
    """The cells of one (H, W) image in `output`: one record per cell for json, the file's bytes for every other
    format (the image itself only shows in the overlay)."""
    return _ENCODERS[output](image, instances)


def encode_stack(labels: list[np.ndarray], axes: str, frame_shape: tuple[int, ...]) -> bytes:
    """Every frame's labels of a stack in one label TIFF with its frame axes: the one file format that holds a
    stack (json holds one record list per frame, from `encode`)."""
    return label_tiff(np.stack(labels), axes, frame_shape)


def describe_cells(instances: Instances) -> list[dict[str, Any]]:
    """Instances -> one dict per cell: id, Kaggle RLE, area, bbox [x, y, width, height], score."""
    runs = rle.label_runs(instances.labels)
    boxes = rle.bounding_boxes(runs, instances.labels.shape[1]).tolist()
    areas, scores = instances.areas.tolist(), instances.scores.tolist()
    cells = zip(runs.labels.tolist(), rle.encode_runs(runs), boxes, strict=True)
    return [
        {"id": label, "rle": text, "area": areas[label - 1], "bbox": box, "score": round(scores[label - 1], 4)}
        for label, text, box in cells
    ]


KaggleRow = tuple[str, str]  # (image id, one cell's row-major RLE, or "" for an image without cells)


def kaggle_rows(image_id: str, instances: Instances) -> list[KaggleRow]:
    """The Kaggle submission rows of one image: one per cell in label order, or one empty row when it has none,
    so every image id appears, as the competition expects."""
    encoded = rle.encode_labels(instances.labels)
    return [(image_id, encoded[label]) for label in sorted(encoded)] or [(image_id, "")]


def submission_csv(rows: list[KaggleRow], header: bool = True) -> bytes:
    """Kaggle submission rows as CSV (`id,predicted`); without the header for one image's part of a larger file."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(["id", "predicted"])
    writer.writerows(rows)
    return buffer.getvalue().encode()


def image_files(
    image_id: str, image: np.ndarray, instances: Instances, formats: list[OutputFormat]
) -> dict[str, bytes]:
    """The files `predict --formats` writes for one image: file name -> bytes (json as its text)."""
    files = {}
    for output in formats:
        data = encode(output, image, instances)
        files[f"{image_id}{output.file_suffix}"] = data if isinstance(data, bytes) else json.dumps(data).encode()
    return files


# ---------------------------------------------------------------- PNGs

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


def for_display(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """(H, W) float image -> the same with its `low` to `high` percentiles stretched to [0, 1], so a person sees the
    cells of a faint image too (a DIC or fluorescence image in a 16-bit file often uses a few hundred of its 65,536
    levels, and shown as stored it is black)."""
    bottom, top = np.percentile(image, (low, high))
    if top <= bottom:
        return np.zeros_like(image, dtype=np.float32) if top == 0 else np.clip(image, 0.0, 1.0)
    return np.clip((image - bottom) / (top - bottom), 0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, labels: np.ndarray, fill: float = 0.25) -> np.ndarray:
    """(H, W) float image in [0, 1] + labels -> (H, W, 3) uint8: the image for_display, each cell tinted and
    outlined in its own colour.

    Only the cells' pixels are blended, in one pass over them, rather than the whole image in float with outlines
    from skimage's find_boundaries: the overlay is built per request.
    """
    gray = to_uint8(for_display(image))
    colors = cell_colors(int(labels.max(initial=0)))
    picture = np.repeat(gray[..., None], 3, axis=-1)
    inside = labels > 0
    tinted = gray[inside].astype(np.float32)[:, None] * (1 - fill) + colors[labels[inside]] * fill
    picture[inside] = np.rint(tinted).astype(np.uint8)
    edges = outlines(labels)
    picture[edges] = colors[labels[edges]]
    return picture


def outlines(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: cell pixels with a 4-neighbour of another label or the background, i.e. skimage's
    find_boundaries(labels, mode="inner"), by shifted comparisons instead of a grey dilation and erosion."""
    differs = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:] != labels[:-1]
    differs[1:] |= vertical
    differs[:-1] |= vertical
    horizontal = labels[:, 1:] != labels[:, :-1]
    differs[:, 1:] |= horizontal
    differs[:, :-1] |= horizontal
    return differs & (labels > 0)


def overlay_png(image: np.ndarray, labels: np.ndarray) -> bytes:
    return png_bytes(overlay(image, labels))


# ---------------------------------------------------------------- files for lab tools


def label_tiff(labels: np.ndarray, axes: str = "", frame_shape: tuple[int, ...] = ()) -> bytes:
    """(H, W) labels, or (N, H, W) for a stack with its frame axes, -> an ImageJ TIFF: 16-bit up to 65535 cells,
    else 32-bit float (exact up to 2**24 cells); zlib-compressed, which Fiji reads. A stack keeps its T and Z
    axes where ImageJ can name them (T before Z), else its frames become one Z axis."""
    data = labels.astype(np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.float32)
    imagej_axes = "".join("T" if axis == "T" else "Z" for axis in axes)
    if labels.ndim == 3 and imagej_axes in ("T", "Z", "TZ"):
        data = data.reshape(*frame_shape, *labels.shape[1:])
    elif labels.ndim == 3:
        imagej_axes = "Z"
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, imagej=True, compression="zlib", metadata={"axes": imagej_axes + "YX"})
    return buffer.getvalue()


def cell_outlines(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(label, (N, 2) x, y vertices of its outline in image coordinates, closed: first == last) for every cell."""
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        stopping.check()
        if window is None:
            continue
        mask = np.pad(labels[window] == index, 1)  # padded, so cells at the window's edge get closed outlines
        contours = measure.find_contours(mask.astype(np.uint8), 0.5)
        if not contours:
            continue
        rows, cols = max(contours, key=len).T
        xy = np.stack((cols + window[1].start - 1 + 0.5, rows + window[0].start - 1 + 0.5), axis=1)
        yield index, xy


def geojson(instances: Instances) -> bytes:
    """A FeatureCollection with one Polygon per cell (pixel coordinates, x right, y down) and its id, area, score
    and a classification QuPath shows; QuPath imports it onto the image."""
    areas, scores = instances.areas.tolist(), instances.scores.tolist()
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [np.round(xy, 2).tolist()]},
            "properties": {
                "objectType": "detection",
                "id": label,
                "area": areas[label - 1],
                "score": round(scores[label - 1], 4),
                "classification": {"name": instances.cell_type or "cell"},
            },
        }
        for label, xy in cell_outlines(instances.labels)
    ]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def coco(instances: Instances, file_name: str = "image.png") -> bytes:
    """COCO instance annotations for one image: one annotation per cell with compressed RLE (column-major, as
    pycocotools encodes it), bbox [x, y, width, height], area and score. Every cell's runs come from one pass over
    the image, so the cost follows the pixels, not cells x pixels."""
    labels = instances.labels
    height, width = labels.shape
    runs = rle.label_runs(labels.T)  # the transposed map's rows are the image's columns: COCO's pixel order
    boxes = rle.bounding_boxes(runs, height)[:, [1, 0, 3, 2]].tolist()  # transposed back: [x, y, width, height]
    annotations = []
    for index, label in enumerate(runs.labels.tolist()):
        stopping.check()
        first, last = runs.bounds[index], runs.bounds[index + 1]
        counts = _coco_counts(runs.starts[first:last], runs.lengths[first:last], height * width)
        compressed = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        annotations.append(
            {
                "id": label,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")},
                "area": int(instances.areas[label - 1]),
                "bbox": boxes[index],
                "score": round(float(instances.scores[label - 1]), 4),
            }
        )
    document: dict[str, Any] = {
        "images": [{"id": 1, "file_name": file_name, "height": height, "width": width}],
        "categories": [{"id": 1, "name": instances.cell_type or "cell"}],
        "annotations": annotations,
    }
    return json.dumps(document).encode()


def _coco_counts(starts: np.ndarray, lengths: np.ndarray, size: int) -> list[int]:
    """One cell's runs (0-indexed starts, in order) -> COCO's uncompressed counts: background and cell pixels in
    turn, beginning with background, to the image's end."""
    ends = starts + lengths
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[0:-1:2] = starts - np.concatenate(([0], ends[:-1]))
    counts[1::2] = lengths
    counts[-1] = size - ends[-1]
    return counts.tolist()


def imagej_rois(labels: np.ndarray) -> bytes:
    """A zip of ImageJ polygon ROIs, one per cell, named cell-<id>: Fiji's ROI Manager opens it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for label, xy in cell_outlines(labels):
            roi = roifile.ImagejRoi.frompoints(xy[:-1], name=f"cell-{label}")  # ImageJ closes polygons itself
            archive.writestr(f"cell-{label}.roi", roi.tobytes())
    return buffer.getvalue()


_ENCODERS: dict[OutputFormat, Callable[[np.ndarray, Instances], Any]] = {
    OutputFormat.JSON: lambda image, instances: describe_cells(instances),
    OutputFormat.PNG: lambda image, instances: label_png(instances.labels),
    OutputFormat.MASK: lambda image, instances: mask_png(instances.labels),
    OutputFormat.OVERLAY: lambda image, instances: overlay_png(image, instances.labels),
    OutputFormat.TIFF: lambda image, instances: label_tiff(instances.labels),
    OutputFormat.ROI: lambda image, instances: imagej_rois(instances.labels),
    OutputFormat.GEOJSON: lambda image, instances: geojson(instances),
    OutputFormat.COCO: lambda image, instances: coco(instances),
}

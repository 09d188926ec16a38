"""Label maps -> the files lab tools open: a label TIFF (Fiji), an ImageJ ROI set (Fiji's ROI Manager), GeoJSON
(QuPath) and COCO instance annotations with compressed RLE (pycocotools).

Outlines are traced on each cell's own mask (marching squares, at pixel edges), the cell's largest outline kept;
holes are not outlined, so a polygon covers its cell and, where the cell has a hole, the hole too.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import roifile
import tifffile
from pycocotools import mask as coco_mask
from scipy import ndimage
from skimage import measure

from app.ml.postprocess import Instances


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
    pycocotools encodes it), bbox [x, y, width, height], area and score."""
    labels = instances.labels
    height, width = labels.shape
    annotations = []
    for label, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        rle = coco_mask.encode(np.asfortranarray(labels == label, dtype=np.uint8))
        rows, cols = window
        annotations.append(
            {
                "id": label,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": int(instances.areas[label - 1]),
                "bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
                "score": round(float(instances.scores[label - 1]), 4),
            }
        )
    document: dict[str, Any] = {
        "images": [{"id": 1, "file_name": file_name, "height": height, "width": width}],
        "categories": [{"id": 1, "name": instances.cell_type or "cell"}],
        "annotations": annotations,
    }
    return json.dumps(document).encode()


def imagej_rois(labels: np.ndarray) -> bytes:
    """A zip of ImageJ polygon ROIs, one per cell, named cell-<id>: Fiji's ROI Manager opens it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for label, xy in cell_outlines(labels):
            roi = roifile.ImagejRoi.frompoints(xy[:-1], name=f"cell-{label}")  # ImageJ closes polygons itself
            archive.writestr(f"cell-{label}.roi", roi.tobytes())
    return buffer.getvalue()

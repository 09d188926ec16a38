"""One annotation file -> an instance label image: (H, W) int32, 0 = background, 1..N = cells.

Label images (TIFF or PNG; 8-, 16-, 32-bit, or float holding whole numbers) keep their values, never scaled; the
cells are renumbered 1..N in the order of their values (labels need not be consecutive). A multi-page or RGB file
is an error, as is one whose only value covers several separate regions (a 0/255 mask, not one value per cell).

Shapes -- QuPath GeoJSON features, Fiji ROIs, COCO polygons or RLE, the service's JSON cells -- become cells one
at a time, in the file's order. Polygon coordinates are x right, y down, in pixel-edge units: pixel (col, row)
covers [col, col + 1) x [row, row + 1), as Fiji, QuPath and app.ml.outputs writes them; a pixel belongs to a
polygon when its centre is inside it (skimage.draw.polygon at the vertices less half a pixel), so the outlines
app.ml.outputs traces come back as the same pixels. COCO polygons and RLE go through pycocotools, as every COCO
tool reads them.

Overlaps: cells must not overlap, but outlines of touching cells drawn by hand often share a thin strip along
their common edge. The rule: a pixel claimed by several shapes belongs to the first of them in the file ("first
wins", as in the Kaggle reader), unless the two share more than 20 % of the smaller one's pixels, which is an
error naming both shapes and the pixels they share: that is two annotations of one cell, or a region drawn
around cells, not an edge.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import roifile
import tifffile
from PIL import Image
from pycocotools import mask as coco_mask
from scipy import ndimage
from skimage import draw

from app.ml import rle
from app.ml.errors import DatasetError, InvalidRLEError

MAX_OVERLAP = 0.2  # of the smaller cell's pixels; more is an error, less goes to the first shape
_AREA_ROIS = {roifile.ROI_TYPE.POLYGON, roifile.ROI_TYPE.FREEHAND, roifile.ROI_TYPE.TRACED, roifile.ROI_TYPE.RECT}
_LABEL_MODES = {"L", "I;16", "I;16L", "I;16B", "I", "P", "1"}
_GEOJSON_TYPES = {"FeatureCollection", "Feature"}

Ring = np.ndarray  # (N, 2) vertices x, y
Part = list[Ring]  # an outline and its holes: a pixel is in the part when it is inside an odd number of rings


class LabelFileError(DatasetError):
    """Problems with one annotation file, each naming the file; the folder's reader lists them with the others."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class LabelSource:
    """Where an image's cells are: kind is 'label-image', 'geojson', 'roi', 'coco' or 'cellseg-json' (the JSON
    /segment answers); a COCO image's annotations travel in `annotations`, as they share one file with others."""

    kind: str
    path: Path
    annotations: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    image: str = ""  # the image's name, where the file holds several images' cells

    @property
    def where(self) -> str:
        return f"{self.path} (image {self.image})" if self.image else str(self.path)


def read_labels(source: LabelSource, shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) int32 labels 1..N of an image of `shape`; LabelFileError naming the file for anything wrong."""
    where = source.where
    if source.kind == "label-image":
        labels = read_label_image(source.path)
        if labels.shape != shape:
            raise LabelFileError(
                f"{where}: the labels are {labels.shape[1]}x{labels.shape[0]} but the image is {shape[1]}x{shape[0]}"
            )
        return labels
    if source.kind == "coco":
        cells = coco_cells(source.annotations, shape, where)
    elif source.kind == "roi":
        cells = roi_cells(source.path, shape)
    elif source.kind == "cellseg-json":
        cells = cellseg_cells(read_json(source.path), shape, where)
    else:
        cells = geojson_cells(read_json(source.path), shape, where)
    return compose(cells, shape, where)


def json_kind(path: Path) -> str:
    """'geojson' or 'cellseg-json' for a per-image JSON file, from its content; LabelFileError for neither."""
    document = read_json(path)
    if isinstance(document, dict) and "cells" in document:
        return "cellseg-json"
    if isinstance(document, list) and document and isinstance(document[0], dict) and "rle" in document[0]:
        return "cellseg-json"
    if isinstance(document, list) or (isinstance(document, dict) and document.get("type") in _GEOJSON_TYPES):
        return "geojson"
    raise LabelFileError(
        f"{path}: neither GeoJSON (a FeatureCollection, a Feature or a list of features, as QuPath exports them) "
        "nor cellseg's JSON (a 'cells' list with one 'rle' per cell)"
    )


def read_json(path: Path) -> Any:
    """A JSON file's document; LabelFileError naming the file when it is empty or not JSON."""
    text = read_bytes(path)
    if not text.strip():
        raise LabelFileError(f"{path}: the file is empty")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelFileError(f"{path}: not readable JSON ({exc})") from exc


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LabelFileError(f"{path}: not readable ({exc.strerror or exc})") from exc


# Label images


def read_label_image(path: Path) -> np.ndarray:
    """A TIFF or PNG label image -> (H, W) int32 labels renumbered 1..N; LabelFileError naming what is wrong."""
    data = read_bytes(path)
    if not data:
        raise LabelFileError(f"{path}: the file is empty")
    try:
        values = _tiff_values(data) if path.suffix.lower() in {".tif", ".tiff"} else _png_values(data)
    except LabelFileError as exc:
        raise LabelFileError(*(f"{path}: {problem}" for problem in exc.problems)) from None
    except Exception as exc:  # any reader failure means the file is not a readable label image
        raise LabelFileError(f"{path}: not a readable label image ({exc})") from exc
    return renumber(values, str(path))


def _tiff_values(data: bytes) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if len(tif.pages) > 1:
            raise LabelFileError(f"it has {len(tif.pages)} pages; a label file holds one 2-D label image")
        page = tif.pages.first
        if page.samplesperpixel > 1:
            raise LabelFileError(
                f"it has {page.samplesperpixel} samples per pixel (RGB?); a label image has one integer per pixel"
            )
        values = page.asarray()
    if values.ndim != 2:
        raise LabelFileError(f"it holds an array of shape {values.shape}; a label image is 2-D")
    return values


def _png_values(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise LabelFileError(f"it is a {img.format} image; label images are TIFF or PNG")
        if getattr(img, "n_frames", 1) > 1:
            raise LabelFileError(f"it has {img.n_frames} frames; a label file holds one 2-D label image")
        if img.mode not in _LABEL_MODES:
            raise LabelFileError(
                f"it is a {img.mode} image; a label image has one integer per pixel (grayscale 8- or 16-bit)"
            )
        return np.asarray(img)


def renumber(values: np.ndarray, where: str) -> np.ndarray:
    """Integer label values (0 = background, any others = cells) -> int32 labels 1..N in the order of the values."""
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise LabelFileError(f"{where}: float labels that are not whole numbers; labels are integers")
        values = values.astype(np.int64)
    present = np.unique(values)
    if present[0] < 0:
        raise LabelFileError(f"{where}: negative labels ({int(present[0])}); 0 is background, 1..N are cells")
    present = present[present != 0]
    if present.size == 0:
        raise LabelFileError(f"{where}: no cells (every pixel is 0, background)")
    if present.size == 1 and (regions := ndimage.label(values != 0)[1]) > 2:
        raise LabelFileError(
            f"{where}: one value ({int(present[0])}) over {regions} separate regions: a mask, not a label image "
            "(one value per cell)"
        )
    labels = np.searchsorted(present, values).astype(np.int32) + 1
    labels[values == 0] = 0
    return labels


# Shapes -> labels

Cell = tuple[str, Callable[[], np.ndarray]]  # a shape's name for messages, and what gives its flat pixel indices


def compose(cells: Iterable[Cell], shape: tuple[int, int], where: str) -> np.ndarray:
    """Cells in the file's order -> (H, W) int32 labels 1..N, the first cell keeping pixels claimed twice;
    LabelFileError listing every cell that is malformed, covers no pixel, or overlaps an earlier one by more
    than MAX_OVERLAP of the smaller of the two."""
    labels = np.zeros(shape[0] * shape[1], dtype=np.int32)
    names: list[str] = []
    areas: list[int] = []
    problems: list[str] = []
    for name, pixels_of in cells:
        try:
            pixels = pixels_of()
        except LabelFileError as exc:
            problems += exc.problems
            continue
        if pixels.size == 0:
            problems.append(f"{where}: {name} covers no pixel of the {shape[1]}x{shape[0]} image")
            continue
        owners = labels[pixels]
        shared = np.bincount(owners, minlength=len(names) + 1)
        for earlier in np.flatnonzero(shared[1:]) + 1:
            smaller = min(int(pixels.size), areas[earlier - 1])
            if shared[earlier] > MAX_OVERLAP * smaller:
                problems.append(
                    f"{where}: {names[earlier - 1]} and {name} overlap by {shared[earlier]} pixels "
                    f"({shared[earlier] / smaller:.0%} of the smaller); over {MAX_OVERLAP:.0%} is more than an edge "
                    "two cells share"
                )
        names.append(name)
        areas.append(int(pixels.size))
        labels[pixels[owners == 0]] = len(names)
    if not names and not problems:
        problems.append(f"{where}: no cells")
    if problems:
        raise LabelFileError(*problems)
    return labels.reshape(shape)


def fill(parts: list[Part], shape: tuple[int, int]) -> np.ndarray:
    """Flat indices of the pixels whose centres are inside the parts (each an outline XOR its holes; parts OR-ed)."""
    points = np.concatenate([ring for part in parts for ring in part])
    height, width = shape
    x0, y0 = np.maximum(np.floor(points.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, (width, height))
    if x1 <= x0 or y1 <= y0:
        return np.zeros(0, dtype=np.int64)
    window = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for part in parts:
        inside = np.zeros_like(window)
        for ring in part:
            rows, cols = draw.polygon(ring[:, 1] - 0.5 - y0, ring[:, 0] - 0.5 - x0, window.shape)
            inside[rows, cols] ^= True
        window |= inside
    rows, cols = np.nonzero(window)
    return (rows + y0).astype(np.int64) * width + cols + x0


def _ring(vertices: Any, name: str, where: str) -> Ring:
    try:
        ring = np.asarray(vertices, dtype=np.float64)
    except (TypeError, ValueError):
        ring = np.zeros((0, 0))
    if ring.ndim != 2 or ring.shape[1] < 2 or not np.isfinite(ring).all():
        raise LabelFileError(f"{where}: {name} has coordinates that are not a list of [x, y] numbers")
    if len(ring) < 3:
        raise LabelFileError(f"{where}: {name} has {len(ring)} vertices; an outline needs at least 3")
    return ring[:, :2]


# GeoJSON (QuPath)


def geojson_cells(document: Any, shape: tuple[int, int], where: str) -> Iterator[Cell]:
    """Every feature of a FeatureCollection, a Feature, or a bare list of features (as QuPath exports them):
    Polygon, MultiPolygon, or a GeometryCollection of them."""
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features")
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    else:
        features = document
    if not isinstance(features, list):
        raise LabelFileError(f"{where}: no list of features (a FeatureCollection's 'features')")
    for number, feature in enumerate(features, start=1):
        name = _feature_name(feature, number)
        yield name, partial(_feature_pixels, feature, name, where, shape)


def _feature_name(feature: Any, number: int) -> str:
    if not isinstance(feature, dict):
        return f"feature {number}"
    properties = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
    label = properties.get("name") or feature.get("id") or properties.get("id")
    return f"feature {number} ({label})" if label not in (None, "") else f"feature {number}"


def _feature_pixels(feature: Any, name: str, where: str, shape: tuple[int, int]) -> np.ndarray:
    if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
        raise LabelFileError(f"{where}: {name} is not a GeoJSON feature with a geometry")
    return fill(_geometry_parts(feature["geometry"], name, where), shape)


def _geometry_parts(geometry: Any, name: str, where: str) -> list[Part]:
    kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
    coordinates = geometry.get("coordinates") if isinstance(geometry, dict) else None
    if kind == "Polygon" and isinstance(coordinates, list) and coordinates:
        return [[_ring(ring, name, where) for ring in coordinates]]
    if kind == "MultiPolygon" and isinstance(coordinates, list) and coordinates:
        return [[_ring(ring, name, where) for ring in polygon] for polygon in coordinates]
    if kind == "GeometryCollection" and isinstance(geometry.get("geometries"), list) and geometry["geometries"]:
        return [part for member in geometry["geometries"] for part in _geometry_parts(member, name, where)]
    raise LabelFileError(f"{where}: {name} is a {kind} geometry; cells are Polygon or MultiPolygon features")


# Fiji ROI sets


def roi_cells(path: Path, shape: tuple[int, int]) -> Iterator[Cell]:
    """Every ROI of a ROI Manager zip: polygon, freehand, traced, rectangle, oval, or composite (its paths XOR-ed,
    so holes stay holes)."""
    try:
        rois = roifile.roiread(path)
    except Exception as exc:  # roifile raises several types for files it cannot read
        raise LabelFileError(f"{path}: not a readable ImageJ ROI set ({exc})") from exc
    rois = [rois] if isinstance(rois, roifile.ImagejRoi) else rois
    if not rois:
        raise LabelFileError(f"{path}: the ROI set holds no ROI")
    for number, roi in enumerate(rois, start=1):
        name = f"ROI {number} ({roi.name})" if roi.name else f"ROI {number}"
        yield name, partial(_roi_pixels, roi, name, str(path), shape)


def _roi_pixels(roi: roifile.ImagejRoi, name: str, where: str, shape: tuple[int, int]) -> np.ndarray:
    if roi.roitype == roifile.ROI_TYPE.OVAL and not roi.composite:
        return fill([[_ellipse(roi.left, roi.top, roi.right, roi.bottom)]], shape)
    if roi.roitype not in _AREA_ROIS and not roi.composite:
        raise LabelFileError(
            f"{where}: {name} is a {roi.roitype.name.lower()} ROI; cells are areas (polygon, freehand, traced, "
            "rectangle, oval or composite ROIs)"
        )
    return fill([[_ring(path, name, where) for path in roi.coordinates(multi=True)]], shape)


def _ellipse(left: float, top: float, right: float, bottom: float) -> Ring:
    """The ellipse inscribed in a box (an oval ROI), as a polygon of about one vertex per pixel of its outline."""
    radii = np.array([right - left, bottom - top], dtype=np.float64) / 2
    angles = np.linspace(0.0, 2 * np.pi, max(64, int(4 * radii.sum())), endpoint=False)
    return np.array([left, top]) + radii + radii * np.stack((np.cos(angles), np.sin(angles)), axis=1)


# COCO


def coco_cells(annotations: Iterable[dict[str, Any]], shape: tuple[int, int], where: str) -> Iterator[Cell]:
    """Every annotation of one COCO image: polygons, uncompressed RLE (counts a list) or compressed RLE (counts a
    string), decoded by pycocotools; crowd annotations (iscrowd 1) are groups of cells, an error."""
    for annotation in annotations:
        name = f"annotation {annotation.get('id')}"
        yield name, partial(_coco_pixels, annotation, name, where, shape)


def _coco_pixels(annotation: dict[str, Any], name: str, where: str, shape: tuple[int, int]) -> np.ndarray:
    if annotation.get("iscrowd"):
        raise LabelFileError(f"{where}: {name} is a crowd (iscrowd 1): a group of cells, not one cell")
    height, width = shape
    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, list) and segmentation:
            polygons = [[float(v) for v in polygon] for polygon in segmentation]
            if any(len(polygon) < 6 or len(polygon) % 2 for polygon in polygons):
                raise LabelFileError(f"{where}: {name} has a polygon that is not 3 or more x, y pairs")
            encoded = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            encoded = _coco_rle(segmentation, name, where, shape)
        else:
            raise LabelFileError(f"{where}: {name} has no segmentation (polygons or RLE)")
        mask = coco_mask.decode(encoded)
    except LabelFileError:
        raise
    except Exception as exc:  # pycocotools raises ValueError, TypeError... for malformed input
        raise LabelFileError(f"{where}: {name}: its segmentation cannot be decoded ({exc})") from exc
    return np.flatnonzero(mask)


def _coco_rle(segmentation: dict[str, Any], name: str, where: str, shape: tuple[int, int]) -> dict[str, Any]:
    size, counts = list(segmentation.get("size") or []), segmentation["counts"]
    if size != list(shape):
        raise LabelFileError(f"{where}: {name}: its RLE's size (height, width) is {size}, the image's is {list(shape)}")
    if isinstance(counts, str):
        return {"size": size, "counts": counts.encode("ascii")}
    if not isinstance(counts, list) or sum(counts) != shape[0] * shape[1]:
        raise LabelFileError(f"{where}: {name}: its uncompressed RLE counts do not add up to height x width")
    return coco_mask.frPyObjects(segmentation, *shape)


# The service's own JSON


def cellseg_cells(document: Any, shape: tuple[int, int], where: str) -> Iterator[Cell]:
    """The cells of a /segment JSON answer (or of `predict --formats json`): one Kaggle-style RLE each."""
    if isinstance(document, dict) and "frames" in document:
        raise LabelFileError(f"{where}: the answer for a stack of frames; training reads one image per file")
    cells = document.get("cells") if isinstance(document, dict) else document
    if isinstance(document, dict) and (document.get("height"), document.get("width")) != shape:
        raise LabelFileError(
            f"{where}: it describes a {document.get('width')}x{document.get('height')} image, the image is "
            f"{shape[1]}x{shape[0]}"
        )
    for number, cell in enumerate(cells if isinstance(cells, list) else [], start=1):
        name = f"cell {cell.get('id', number)}" if isinstance(cell, dict) else f"cell {number}"
        yield name, partial(_rle_pixels, cell, name, where, shape)


def _rle_pixels(cell: Any, name: str, where: str, shape: tuple[int, int]) -> np.ndarray:
    try:
        return np.flatnonzero(rle.decode(cell["rle"], shape))
    except (InvalidRLEError, KeyError, TypeError) as exc:
        raise LabelFileError(f"{where}: {name}: not a valid RLE ({exc})") from exc

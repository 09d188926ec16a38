"""Every output format: the files for lab tools read back with the library the tool itself uses and compared cell by
cell with the labels; the PNGs and the overlay a person looks at."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import roifile
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as coco_mask
from skimage.draw import polygon
from skimage.segmentation import find_boundaries

from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from app.ml.outputs import (
    OutputFormat,
    cell_colors,
    coco,
    encode,
    for_display,
    geojson,
    imagej_rois,
    label_png,
    label_tiff,
    outlines,
    overlay,
)
from app.ml.postprocess import Instances


@pytest.fixture(scope="module")
def instances() -> Instances:
    labels = generate_image(np.random.default_rng(4), 200, 260, "shsy5y", density=1.0).labels.astype(np.int32)
    count = int(labels.max())
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return Instances(labels, np.linspace(0.5, 1.0, count), areas, cell_type="shsy5y")


def rasterize(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside the polygon (vertices in pixel-edge coordinates)."""
    mask = np.zeros(shape, bool)
    rows, cols = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
    mask[rows, cols] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_the_label_tiff_reads_back_as_the_labels(instances):
    with tifffile.TiffFile(io.BytesIO(label_tiff(instances.labels))) as tif:
        assert tif.is_imagej
        assert np.array_equal(tif.asarray(), instances.labels)
        assert tif.pages.first.dtype == np.uint16


def test_coco_rle_decodes_to_each_cell_exactly(instances):
    document = json.loads(coco(instances, "cells.png"))
    assert document["images"][0] == {"id": 1, "file_name": "cells.png", "height": 200, "width": 260}
    annotations = document["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, instances.count + 1))
    for annotation in annotations:
        rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        assert np.array_equal(coco_mask.decode(rle).astype(bool), instances.labels == annotation["id"])
        assert coco_mask.area(rle) == annotation["area"]
        x, y, w, h = annotation["bbox"]
        assert np.array_equal(coco_mask.toBbox(rle), [x, y, w, h])


def test_geojson_polygons_cover_their_cells(instances):
    document = json.loads(geojson(instances))
    assert document["type"] == "FeatureCollection" and len(document["features"]) == instances.count
    for feature in document["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all(), "GeoJSON rings are closed"
        cell = instances.labels == feature["properties"]["id"]
        assert feature["properties"]["area"] == cell.sum()
        assert iou(rasterize(ring, cell.shape), cell) > 0.7
    ious = [
        iou(
            rasterize(np.asarray(f["geometry"]["coordinates"][0]), instances.labels.shape),
            instances.labels == f["properties"]["id"],
        )
        for f in document["features"]
    ]
    assert np.mean(ious) > 0.9


def test_imagej_rois_open_with_roifile_and_cover_their_cells(instances, tmp_path):
    path = tmp_path / "cells.zip"
    path.write_bytes(imagej_rois(instances.labels))
    rois = roifile.roiread(path)
    assert len(rois) == instances.count
    ious = []
    for roi in rois:
        assert roi.roitype in (roifile.ROI_TYPE.POLYGON, roifile.ROI_TYPE.FREEHAND)
        label = int(roi.name.removeprefix("cell-"))
        ious.append(iou(rasterize(roi.coordinates(), instances.labels.shape), instances.labels == label))
    assert min(ious) > 0.7 and np.mean(ious) > 0.9


@settings(max_examples=200, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 30), st.integers(1, 30)), elements=st.integers(0, 4)))
def test_outlines_are_skimages_inner_boundaries(labels):
    assert np.array_equal(outlines(labels), find_boundaries(labels, mode="inner"))


def test_overlay_keeps_the_background_outlines_each_cell_in_its_colour_and_tints_inside():
    image = np.random.default_rng(0).random((40, 50), dtype=np.float32)
    labels = np.zeros((40, 50), dtype=np.int32)
    labels[5:20, 5:25] = 1
    labels[10:30, 25:45] = 2
    picture = overlay(image, labels, fill=0.25)
    gray, colors = to_uint8(for_display(image)), cell_colors(2)
    assert picture.shape == (40, 50, 3) and picture.dtype == np.uint8
    background = labels == 0
    assert np.array_equal(picture[background], np.repeat(gray[background][:, None], 3, axis=1))
    edges = outlines(labels)
    assert np.array_equal(picture[edges], colors[labels[edges]])
    inside = (labels > 0) & ~edges
    expected = 0.75 * gray[inside][:, None] + 0.25 * colors[labels[inside]].astype(np.float32)
    assert np.abs(picture[inside] - expected).max() <= 0.5


def test_a_faint_sixteen_bit_image_is_shown_across_the_whole_range():
    # A DIC image in a 16-bit file with values 30..250, as read: 0.0005..0.004.
    image = np.random.default_rng(1).integers(30, 251, (40, 50)).astype(np.float32) / 65535
    picture = overlay(image, np.zeros((40, 50), dtype=np.int32))
    assert picture.min() == 0 and picture.max() == 255
    flat = overlay(np.full((8, 8), 0.5, dtype=np.float32), np.zeros((8, 8), dtype=np.int32))
    assert np.all(flat == 128)  # nothing to stretch: shown as it is


def test_label_png_round_trips_the_labels():
    labels = np.arange(12, dtype=np.int32).reshape(3, 4) * 5000
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(label_png(labels)))), labels)


def test_every_format_encodes_one_image(instances):
    image = np.random.default_rng(0).random(instances.labels.shape, dtype=np.float32)
    for output in OutputFormat:
        encoded = encode(output, image, instances)
        if output is OutputFormat.JSON:
            assert [cell["id"] for cell in encoded] == np.unique(instances.labels[instances.labels > 0]).tolist()
        else:
            assert isinstance(encoded, bytes) and encoded and output.media_type and output.file_suffix

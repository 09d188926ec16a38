"""Every export is read back with the library the lab tool itself uses and compared cell by cell with the labels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import roifile
import tifffile
from pycocotools import mask as coco_mask
from skimage.draw import polygon

from app.ml.data.synth import generate_image
from app.ml.exports import coco, geojson, imagej_rois, label_tiff
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

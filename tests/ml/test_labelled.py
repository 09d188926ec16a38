"""Labelled folders in the layouts labs keep: each written by the library labs write it with, read back."""

import json
import logging

import numpy as np
import pytest
import roifile
import tifffile
from PIL import Image
from pycocotools import mask as coco_mask

from app.evaluate import main as evaluate
from app.ml import outputs as exports
from app.ml.data.kaggle import KaggleDataset
from app.ml.data.labelled import LAYOUTS, open_labelled
from app.ml.errors import DatasetError
from app.ml.imageio import read_image
from app.ml.outputs import describe_cells, label_png
from app.ml.postprocess import Instances
from tests.conftest import LAB_HELA, LAB_U373, MODEL_STORE, disk, shared_lab_folder

SHAPE = (96, 128)


def cells_scene(shape=SHAPE) -> np.ndarray:
    """Five disks, two of them touching, as int32 labels 1..5."""
    labels = np.zeros(shape, dtype=np.int32)
    for number, (centre, radius) in enumerate(
        [((20, 24), 10), ((60, 30), 14), ((30, 80), 12), ((70, 90), 11), ((70, 110), 10)], start=1
    ):
        labels[disk(shape, centre, radius)] = number
    return labels


def gray(shape=SHAPE, seed=0, dtype=np.uint8) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 4000
    return np.random.default_rng(seed).integers(0, top, shape).astype(dtype)


def save_png(path, array) -> None:
    Image.fromarray(array).save(path)


def same_cells(got: np.ndarray, want: np.ndarray, iou: float = 0.9) -> None:
    """The same number of cells, and each wanted cell matched by one with IoU above `iou`."""
    assert got.shape == want.shape and got.dtype == np.int32
    assert got.max() == want.max() == len(np.unique(got)) - 1
    for number in range(1, want.max() + 1):
        cell = want == number
        match = np.bincount(got[cell]).argmax()
        assert match > 0
        other = got == match
        assert (cell & other).sum() / (cell | other).sum() > iou, number


def problem(folders, *words):
    """The DatasetError reading `folders` raises, checked to contain every one of `words`."""
    with pytest.raises(DatasetError) as caught:
        open_labelled(folders if isinstance(folders, list) else [folders]).load(0)
    message = str(caught.value)
    for word in words:
        assert str(word) in message, message
    return message


# Each layout


def test_cellpose_pairs_16_bit_tiff_and_8_bit_png_keep_their_cells(tmp_path, caplog):
    folder = tmp_path / "lab-a"
    folder.mkdir()
    labels = cells_scene()
    sparse = np.array([0, 3, 7, 300, 301, 65535], dtype=np.uint16)[labels]  # not consecutive, 16-bit
    tifffile.imwrite(folder / "a.tif", gray(dtype=np.uint16))
    tifffile.imwrite(folder / "a_masks.tif", sparse)
    save_png(folder / "b.png", gray(seed=1))
    save_png(folder / "b_masks.png", (labels * 40).astype(np.uint8))
    (folder / "README.md").write_text("not data")
    with caplog.at_level(logging.INFO, logger="cellseg.data"):
        data = open_labelled([folder])
    assert f"{folder}: pairs layout, 2 images, 10 cells" in caplog.text
    assert data.layouts == {str(folder): "pairs"} and data.root == str(folder)
    assert data.image_ids == ["a", "b"] and len(data) == 2
    assert [r.sample_id for r in data.records] == ["a", "b"] and {r.cell_type for r in data.records} == {"lab-a"}
    first, second = data
    assert np.array_equal(first.labels, labels) and np.array_equal(second.labels, labels)
    assert np.array_equal(first.image, read_image(folder / "a.tif"))  # as the service decodes an upload
    assert first.image.dtype == np.float32 and first.image.max() < 4000 / 65535 + 1e-6
    assert first.cell_types == ["lab-a"] * 5 and first.metadata["labels"] == "a_masks.tif"
    fingerprint = data.fingerprint()
    assert fingerprint == open_labelled([folder]).fingerprint()
    tifffile.imwrite(folder / "a_masks.tif", sparse[::-1].copy())
    assert open_labelled([folder]).fingerprint() != fingerprint


def test_images_beside_masks_or_labels_folders_match_by_name(tmp_path):
    labels = cells_scene()
    for name in ("masks", "labels"):
        folder = tmp_path / name
        (folder / "images").mkdir(parents=True)
        (folder / name).mkdir()
        save_png(folder / "images" / "x1.png", gray())
        tifffile.imwrite(folder / name / "x1.tif", labels.astype(np.uint16))  # another extension, same name
        data = open_labelled([folder], cell_type="hela")
        assert data.layouts[str(folder)] == "pairs" and data.image_ids == ["x1"]
        sample = data.load(0)
        assert np.array_equal(sample.labels, labels) and sample.cell_type == "hela"


def test_cell_tracking_challenge_frames_with_a_man_seg_are_the_labelled_ones(tmp_path, caplog):
    folder = tmp_path / "ctc"
    labels = cells_scene()
    for sequence, digits, labelled in (("01", 3, (1, 3)), ("02", 4, (2,))):
        (folder / sequence).mkdir(parents=True)
        (folder / f"{sequence}_GT" / "SEG").mkdir(parents=True)
        (folder / f"{sequence}_GT" / "TRA").mkdir()  # tracking markers: not read
        for frame in range(4):
            tifffile.imwrite(folder / sequence / f"t{frame:0{digits}d}.tif", gray(seed=frame))
        for frame in labelled:
            tifffile.imwrite(
                folder / f"{sequence}_GT" / "SEG" / f"man_seg{frame:0{digits}d}.tif", labels.astype(np.uint16)
            )
    with caplog.at_level(logging.INFO, logger="cellseg.data"):
        data = open_labelled([folder], cell_type="u373")
    assert "ctc layout, 3 images, 15 cells (sequence 01: 2 of 4 frames labelled; sequence 02: 1 of 4" in caplog.text
    assert data.layouts[str(folder)] == "ctc"
    assert data.image_ids == ["01-t001", "01-t003", "02-t0002"] == [r.sample_id for r in data.records]
    sample = data.load(2)
    assert np.array_equal(sample.image, read_image(folder / "02" / "t0002.tif"))
    assert np.array_equal(sample.labels, labels)
    assert sample.metadata["sequence"] == "02" and sample.metadata["frame"] == "0002"


def test_coco_polygons_uncompressed_and_compressed_rle(tmp_path):
    folder = tmp_path / "coco"
    (folder / "images").mkdir(parents=True)
    labels = cells_scene()
    height, width = SHAPE
    images, annotations = [], []
    for image_id, form in enumerate(("polygons", "rle", "compressed"), start=1):
        save_png(folder / "images" / f"{form}.png", gray(seed=image_id))
        images.append({"id": image_id, "file_name": f"{form}.png", "height": height, "width": width})
        for number in range(1, labels.max() + 1):
            mask = np.asfortranarray(labels == number, dtype=np.uint8)
            if form == "polygons":
                xy = dict(exports.cell_outlines(labels))[number]
                segmentation = [xy.ravel().tolist()]
            elif form == "rle":
                column_major = mask.ravel(order="F")
                edges = np.flatnonzero(np.diff(np.concatenate(([0], column_major, [1 - column_major[-1]]))))
                segmentation = {"size": [height, width], "counts": np.diff(np.concatenate(([0], edges))).tolist()}
            else:
                encoded = coco_mask.encode(mask)
                segmentation = {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
    document = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cell"}]}
    (folder / "instances.json").write_text(json.dumps(document))
    data = open_labelled([folder])
    assert data.layouts[str(folder)] == "coco" and data.image_ids == ["polygons", "rle", "compressed"]
    polygons, uncompressed, compressed = data
    same_cells(polygons.labels, labels)
    assert np.array_equal(uncompressed.labels, labels) and np.array_equal(compressed.labels, labels)
    assert polygons.cell_type == "coco"


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def qupath_feature(geometry, name=None):
    properties = {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}
    if name:
        properties["name"] = name
    return {
        "type": "Feature",
        "id": "6f1f0b1c-0d8a-4c2b-9a51-0e6f2f7a1b11",
        "geometry": geometry,
        "properties": properties,
    }


def test_qupath_geojson_feature_collections_and_bare_feature_lists(tmp_path):
    folder = tmp_path / "qupath"
    folder.mkdir()
    features = [
        qupath_feature({"type": "Polygon", "coordinates": [square(2, 3, 10, 8)]}),
        qupath_feature({"type": "Polygon", "coordinates": [square(20, 10, 40, 30), square(25, 15, 30, 20)]}),
        qupath_feature({"type": "MultiPolygon", "coordinates": [[square(50, 50, 55, 55)], [square(60, 50, 62, 60)]]}),
    ]
    save_png(folder / "one.png", gray())
    (folder / "one.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    tifffile.imwrite(folder / "two.tif", gray(seed=2))
    (folder / "two.json").write_text(json.dumps(features))  # QuPath's "export as a list of features"
    data = open_labelled([folder])
    assert data.layouts[str(folder)] == "geojson"
    want = np.zeros(SHAPE, dtype=np.int32)
    want[3:8, 2:10] = 1  # pixel-edge coordinates: x 2..10 covers columns 2..9
    want[10:30, 20:40] = 2
    want[15:20, 25:30] = 0  # the hole
    want[50:55, 50:55] = 3
    want[50:60, 60:62] = 3
    for sample in data:
        assert np.array_equal(sample.labels, want)


def test_fiji_roi_sets_of_polygon_rectangle_and_oval_rois(tmp_path):
    folder = tmp_path / "fiji"
    folder.mkdir()
    polygon = roifile.ImagejRoi.frompoints([[2, 3], [10, 3], [10, 8], [2, 8]], name="cell-a")
    rect = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=20, top=10, right=40, bottom=30, name="cell-b")
    oval = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.OVAL, left=50, top=40, right=90, bottom=70, name="cell-c")
    for name, ending in (("one", ".zip"), ("two", "_rois.zip"), ("three", "-rois.zip")):
        tifffile.imwrite(folder / f"{name}.tif", gray())
        roifile.roiwrite(folder / f"{name}{ending}", [polygon, rect, oval])
    data = open_labelled([folder])
    assert data.layouts[str(folder)] == "roi" and sorted(data.image_ids) == ["one", "three", "two"]
    want = np.zeros(SHAPE, dtype=np.int32)
    want[3:8, 2:10] = 1
    want[10:30, 20:40] = 2
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    want[((xx + 0.5 - 70) / 20) ** 2 + ((yy + 0.5 - 55) / 15) ** 2 <= 1] = 3  # the ellipse in the box, by centres
    for sample in data:
        assert np.array_equal(sample.labels == 1, want == 1) and np.array_equal(sample.labels == 2, want == 2)
        same_cells(sample.labels, want, iou=0.95)


@pytest.mark.parametrize("fmt", ["tiff", "png", "roi", "geojson", "coco", "json"])
def test_what_the_service_writes_comes_back_as_the_same_cells(tmp_path, fmt):
    labels = cells_scene()
    instances = Instances(labels, np.full(5, 0.9, np.float32), np.bincount(labels.ravel())[1:], "cort")
    written = {  # predict --formats FMT: the file names it gives, beside the image
        "tiff": ("-labels.tif", exports.label_tiff(labels)),
        "png": ("-labels.png", label_png(labels)),
        "roi": ("-rois.zip", exports.imagej_rois(labels)),
        "geojson": (".geojson", exports.geojson(instances)),
        "coco": ("-coco.json", exports.coco(instances)),  # its file_name is "image.png": the service cannot know
        "json": (".json", json.dumps(describe_cells(instances)).encode()),
    }
    ending, data = written[fmt]
    folder = tmp_path / "corrected"
    folder.mkdir()
    tifffile.imwrite(folder / "plate7.tif", gray())
    (folder / f"plate7{ending}").write_bytes(data)
    dataset = open_labelled([folder], cell_type="cort")
    sample = dataset.load(0)
    assert dataset.image_ids == ["plate7"] and sample.cell_types == ["cort"] * 5
    if fmt in {"tiff", "png", "coco", "json"}:
        assert np.array_equal(sample.labels, labels)
    else:  # outlines traced at pixel edges and filled by pixel centres: the same pixels, holes aside
        same_cells(sample.labels, labels, iou=0.99)


def test_the_answer_of_segment_as_json_reads_back(tmp_path):
    labels = cells_scene()
    instances = Instances(labels, np.full(5, 0.9, np.float32), np.bincount(labels.ravel())[1:])
    answer = {"filename": "a.png", "width": SHAPE[1], "height": SHAPE[0], "cells": describe_cells(instances)}
    save_png(tmp_path / "a.png", gray())
    (tmp_path / "a.json").write_text(json.dumps(answer))
    data = open_labelled([tmp_path])
    assert data.layouts[str(tmp_path)] == "cellseg-json" and np.array_equal(data.load(0).labels, labels)


def test_kaggle_folders_read_as_before(synth_dataset, tmp_path):
    data = open_labelled([synth_dataset], cell_type="ignored")
    before = KaggleDataset(synth_dataset)
    assert data.layouts == {str(synth_dataset): "kaggle"}
    assert data.image_ids == before.image_ids and data.fingerprint() == before.fingerprint()
    assert [r.sample_id for r in data.records] == [r.sample_id for r in before.records]
    assert [r.cell_type for r in data.records] == [r.cell_type for r in before.records]
    got, want = data.load(1), before.load(1)
    assert np.array_equal(got.labels, want.labels) and got.cell_types == want.cell_types
    assert got.metadata == want.metadata


def test_folders_of_different_layouts_are_one_dataset(synth_dataset, tmp_path):
    folder = tmp_path / "lab"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", gray())
    tifffile.imwrite(folder / "a_masks.tif", cells_scene().astype(np.uint16))
    data = open_labelled([synth_dataset, folder])
    assert data.layouts == {str(synth_dataset): "kaggle", str(folder): "pairs"}
    assert data.image_ids[-1] == "a" and data.load(len(data) - 1).cell_type == "lab"
    assert data.root == f"{synth_dataset}, {folder}"
    assert len(data.fingerprint()) == 64


# Overlaps


def test_shapes_overlapping_along_an_edge_go_to_the_first_one(tmp_path):
    features = [
        qupath_feature({"type": "Polygon", "coordinates": [square(10, 10, 30, 30)]}),
        qupath_feature({"type": "Polygon", "coordinates": [square(29, 10, 50, 30)]}),
    ]
    save_png(tmp_path / "a.png", gray())
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    labels = open_labelled([tmp_path]).load(0).labels
    assert (labels == 1).sum() == 400 and (labels == 2).sum() == 20 * 20  # column 29 stays with the first
    assert (labels[10:30, 29] == 1).all()


def test_shapes_overlapping_over_a_fifth_of_a_cell_are_an_error(tmp_path):
    features = [
        qupath_feature({"type": "Polygon", "coordinates": [square(10, 10, 30, 30)]}, "big"),
        qupath_feature({"type": "Polygon", "coordinates": [square(20, 20, 25, 25)]}, "inside"),
    ]
    save_png(tmp_path / "a.png", gray())
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    problem(tmp_path, "a.geojson", "feature 1 (big) and feature 2 (inside) overlap by 25 pixels (100%")


def test_overlapping_rois_are_named(tmp_path):
    first = roifile.ImagejRoi.frompoints([[10, 10], [30, 10], [30, 30], [10, 30]], name="cell-1")
    second = roifile.ImagejRoi.frompoints([[15, 10], [35, 10], [35, 30], [15, 30]], name="cell-2")
    tifffile.imwrite(tmp_path / "a.tif", gray())
    roifile.roiwrite(tmp_path / "a.zip", [first, second])
    problem(tmp_path, "a.zip", "ROI 1 (cell-1) and ROI 2 (cell-2) overlap by 300 pixels")


# Bad data


def pair_folder(tmp_path, name="bad"):
    folder = tmp_path / name
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", gray())
    return folder


def test_labels_of_another_size_than_the_image(tmp_path):
    folder = pair_folder(tmp_path)
    tifffile.imwrite(folder / "a_masks.tif", cells_scene((64, 64)).astype(np.uint16))
    problem(folder, "a_masks.tif", "the labels are 64x64 but the image is 128x96")


def test_empty_unreadable_and_cell_less_files(tmp_path):
    folder = pair_folder(tmp_path)
    (folder / "a_masks.tif").write_bytes(b"")
    save_png(folder / "b.png", gray())
    (folder / "b_masks.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    save_png(folder / "c.png", gray())
    save_png(folder / "c_masks.png", np.zeros(SHAPE, dtype=np.uint8))
    (folder / "d.png").write_bytes(b"")
    tifffile.imwrite(folder / "d_masks.tif", cells_scene().astype(np.uint16))
    message = problem(
        folder,
        "4 problem(s)",
        "a_masks.tif: the file is empty",
        "b_masks.png: not a readable label",
        "c_masks.png: no cells",
        "d.png: the image file is empty",
    )
    assert str(folder) in message


def test_multi_page_rgb_and_binary_label_files(tmp_path):
    folder = pair_folder(tmp_path)
    tifffile.imwrite(folder / "a_masks.tif", np.stack([cells_scene()] * 2).astype(np.uint16))
    save_png(folder / "b.png", gray())
    save_png(folder / "b_masks.png", np.stack([cells_scene().astype(np.uint8)] * 3, axis=-1))
    save_png(folder / "c.png", gray())
    save_png(folder / "c_masks.png", ((cells_scene() > 0) & (cells_scene() != 5)).astype(np.uint8) * 255)
    problem(
        folder,
        "a_masks.tif: it has 2 pages",
        "b_masks.png: it is a RGB image",
        "c_masks.png: one value (255) over 4 separate regions",
    )


def test_images_without_labels_and_labels_without_images_are_listed(tmp_path):
    folder = pair_folder(tmp_path)
    tifffile.imwrite(folder / "a_masks.tif", cells_scene().astype(np.uint16))
    for name in ("b.png", "c.png"):
        save_png(folder / name, gray())
    tifffile.imwrite(folder / "z_masks.tif", cells_scene().astype(np.uint16))
    problem(folder, "no label file beside b.png, c.png", "no image beside the label files z_masks.tif")


def test_an_image_with_several_label_files_is_ambiguous(tmp_path):
    folder = pair_folder(tmp_path)
    tifffile.imwrite(folder / "a_masks.tif", cells_scene().astype(np.uint16))
    (folder / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    problem(folder, "a.tif: several label files beside it", "a_masks.tif", "a.geojson")


def test_a_folder_in_no_layout_says_which_layouts_are_read(tmp_path):
    save_png(tmp_path / "a.png", gray())
    message = problem(tmp_path, "not a labelled folder", "1 images and no label file beside any of them")
    assert LAYOUTS in message
    (tmp_path / "01").mkdir()
    problem(tmp_path, "sequence folders 01 without 01_GT/SEG")
    problem(tmp_path / "missing", "no such folder")


def test_image_ids_repeated_across_folders(tmp_path):
    first, second = pair_folder(tmp_path, "one"), pair_folder(tmp_path, "two")
    for folder in (first, second):
        tifffile.imwrite(folder / "a_masks.tif", cells_scene().astype(np.uint16))
    problem([first, second], "image ids ['a'] appear in more than one of the folders")


def test_bad_shapes_are_named_with_their_file(tmp_path):
    save_png(tmp_path / "a.png", gray())
    features = [
        qupath_feature({"type": "Point", "coordinates": [3, 4]}, "dot"),
        qupath_feature({"type": "Polygon", "coordinates": [[[1, 1], [2, 2]]]}, "thin"),
        qupath_feature({"type": "Polygon", "coordinates": [square(500, 500, 510, 510)]}, "away"),
    ]
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    save_png(tmp_path / "b.png", gray())
    line = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.LINE, x1=1, y1=1, x2=20, y2=20, name="a-line")
    roifile.roiwrite(tmp_path / "b-rois.zip", [line])
    save_png(tmp_path / "c.png", gray())
    (tmp_path / "c.json").write_text("{not json")
    problem(
        tmp_path,
        "a.geojson: feature 1 (dot) is a Point",
        "a.geojson: feature 2 (thin) has 2 vertices",
        "a.geojson: feature 3 (away) covers no pixel",
        "b-rois.zip: ROI 1 (a-line) is a line ROI",
        "c.json: not readable JSON",
    )


def test_coco_problems_name_the_json_and_the_image(tmp_path):
    save_png(tmp_path / "a.png", gray())
    save_png(tmp_path / "b.png", gray())
    save_png(tmp_path / "unlisted.png", gray())
    document = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 96, "width": 128},
            {"id": 2, "file_name": "b.png", "height": 90, "width": 128},
            {"id": 3, "file_name": "gone.png", "height": 96, "width": 128},
        ],
        "annotations": [
            {"id": 7, "image_id": 1, "iscrowd": 1, "segmentation": [square(1, 1, 9, 9)[0] * 3]},
            {"id": 8, "image_id": 2, "iscrowd": 0, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
            {"id": 9, "image_id": 5, "iscrowd": 0, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
        ],
    }
    (tmp_path / "cells.json").write_text(json.dumps(document))
    problem(
        tmp_path,
        "cells.json: annotations 9 belong to no image",
        "gone.png",
        "b.png is 128x96, its entry says 128x90",
        "cells.json (image a.png): annotation 7 is a crowd",
        "images that no COCO file lists: unlisted.png",
    )


# The real lab folders in ../shared/data


@pytest.fixture(scope="module")
def lab_u373():
    return shared_lab_folder(LAB_U373)


@pytest.fixture(scope="module")
def lab_hela():
    return shared_lab_folder(LAB_HELA)


def test_the_real_u373_folder_is_ctc_with_28_cells(lab_u373):
    data = open_labelled([lab_u373])
    assert data.layouts == {str(lab_u373): "ctc"}
    assert data.image_ids == ["02-t010", "02-t017", "02-t019", "02-t020", "02-t022"]
    samples = list(data)
    assert sum(int(s.labels.max()) for s in samples) == 28
    assert all(s.image.shape == s.labels.shape == (520, 696) for s in samples)
    assert {s.cell_type for s in samples} == {"lab-u373"}


def test_the_real_hela_folder_is_cellpose_pairs_of_10_to_14_cells(lab_hela):
    data = open_labelled([lab_hela], cell_type="hela")
    assert data.layouts == {str(lab_hela): "pairs"} and len(data) == 5
    for sample in data:
        assert 10 <= sample.labels.max() <= 14 and len(np.unique(sample.labels)) == sample.labels.max() + 1
        # 16-bit images of values about 30..255: divided by 65535, as the service decodes the same upload
        assert sample.image.max() < 256 / 65535 and sample.image.shape == (512, 512)
        assert sample.cell_types == ["hela"] * int(sample.labels.max())


def test_evaluate_scores_the_shipped_model_on_the_u373_folder(lab_u373, capsys):
    evaluate(
        [
            "--model",
            str(MODEL_STORE / "sartorius-w16-v3"),
            "--data",
            str(lab_u373),
            "--cell-type",
            "u373",
            "--no-compile",
            "--backend",
            "torch",
            "--torch-threads",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert "on 5 image(s), 28 cells" in printed and "u373" in printed

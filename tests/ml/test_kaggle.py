import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from app.ml import rle
from app.ml.data.kaggle import CSV_COLUMNS, KaggleDataset, labels_from_rles
from app.ml.data.labelled import open_labelled
from app.ml.data.synth import write_dataset
from app.ml.errors import DatasetError


def test_the_real_sample_loads_into_a_label_map_with_247_cells(sartorius):
    dataset = KaggleDataset(sartorius)
    assert dataset.image_ids == ["0030fd0e6378"]
    sample = dataset.load(0)
    assert sample.image.shape == sample.labels.shape == (520, 448)
    assert sample.image.dtype == np.float32 and 0.0 <= sample.image.min() < sample.image.max() <= 1.0
    assert sample.labels.max() == 247
    assert len(np.unique(sample.labels)) == 248  # every cell keeps pixels, plus background
    assert sample.cell_type == "shsy5y" and len(sample.cell_types) == 247
    assert sample.metadata["sample_id"] == "shsy5y[diff]_E10-4_Vessel-714_Ph_3"
    assert sample.metadata["plate_time"] == "11h30m00s"


def test_the_real_sample_label_map_matches_its_rles(sartorius):
    dataset = KaggleDataset(sartorius)
    record, sample = dataset.records[0], dataset.load(0)
    for number, cell in enumerate(record.cells, start=1):
        mask = rle.decode(cell.annotation, sample.labels.shape)
        # First row wins: a cell keeps every pixel no earlier cell claimed.
        earlier = np.isin(sample.labels, np.arange(1, number))
        assert np.array_equal(sample.labels == number, mask & ~earlier)


def test_overlapping_annotations_go_to_the_first_row():
    first = np.zeros((4, 5), dtype=bool)
    first[1, 1:4] = True
    second = np.zeros((4, 5), dtype=bool)
    second[1:3, 3] = True  # shares pixel (1, 3) with the first
    labels = labels_from_rles([rle.encode(first), rle.encode(second)], (4, 5))
    assert labels[1, 3] == 1 and labels[2, 3] == 2
    assert (labels == 1).sum() == 3 and (labels == 2).sum() == 1


def test_synthetic_data_reads_back_unchanged(synth_dataset):
    dataset = KaggleDataset(synth_dataset)
    assert len(dataset) == 6
    sample = dataset.load(0)
    again = labels_from_rles([c.annotation for c in dataset.records[0].cells], sample.labels.shape)
    assert np.array_equal(sample.labels, again)
    assert sample.labels.max() == len(dataset.records[0].cells) > 10
    assert {r.cell_type for r in dataset.records} == {"shsy5y", "astro", "cort"}
    assert len({r.sample_id for r in dataset.records}) == 3


def copy_with_rows(src, dst, edit):
    """Copy a Kaggle folder, letting `edit` change the list of CSV rows."""
    shutil.copytree(src, dst)
    with (src / "train.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    rows = edit(rows)
    with (dst / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return dst


def test_a_row_whose_rle_does_not_fit_is_reported_with_its_line(synth_dataset, tmp_path):
    def break_row(rows):
        rows[3]["annotation"] = "999999 5"
        rows[5]["annotation"] = "1 2 3"
        return rows

    folder = copy_with_rows(synth_dataset, tmp_path / "bad", break_row)
    with pytest.raises(DatasetError) as info:
        KaggleDataset(folder)
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "train.csv line 5:" in message and "past the image" in message  # header is line 1
    assert "train.csv line 7:" in message and "odd number of values" in message


def test_a_missing_image_is_reported_with_its_line(synth_dataset, tmp_path):
    folder = copy_with_rows(synth_dataset, tmp_path / "missing", lambda rows: rows)
    first_id = KaggleDataset(folder).image_ids[1]
    (folder / "train" / f"{first_id}.png").unlink()
    with pytest.raises(DatasetError, match=rf"line \d+: image {first_id}: .*{first_id}.png not found"):
        KaggleDataset(folder)


def test_an_image_of_another_size_than_the_csv_says_is_reported(synth_dataset, tmp_path):
    folder = copy_with_rows(synth_dataset, tmp_path / "resized", lambda rows: rows)
    image_id = KaggleDataset(folder).image_ids[0]
    path = folder / "train" / f"{image_id}.png"
    Image.open(path).resize((100, 90)).save(path)
    with pytest.raises(DatasetError, match=r"the CSV says 160x128 but .* is 100x90"):
        KaggleDataset(folder)


def test_a_missing_csv_names_the_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"train\.csv and train/<id>\.png"):
        KaggleDataset(tmp_path)


def test_several_folders_read_as_one_dataset_and_an_image_in_two_of_them_is_refused(tmp_path):
    first = write_dataset(tmp_path / "a", images=2, height=64, width=80, seed=1)
    second = write_dataset(tmp_path / "b", images=3, height=48, width=48, seed=2)
    both = open_labelled([first, second])
    assert len(both) == 5 and both.image_ids == KaggleDataset(first).image_ids + KaggleDataset(second).image_ids
    assert both.load(4).image.shape == (48, 48) and both.load(4).image_id == both.image_ids[4]
    assert both.fingerprint() != KaggleDataset(first).fingerprint()
    assert open_labelled([first]).fingerprint() == KaggleDataset(first).fingerprint()
    with pytest.raises(DatasetError, match="more than one"):
        open_labelled([first, first])

import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from app.ml import rle
from app.ml.errors import InvalidRLEError


def test_every_golden_competition_row_round_trips_exactly(sartorius):
    with (sartorius / "rle_golden.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 236
    for row in rows:
        mask = rle.decode(row["annotation"], (int(row["height"]), int(row["width"])))
        assert mask.any()
        assert rle.encode(mask) == row["annotation"]


def test_pixels_are_numbered_row_major_from_one():
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1] = mask[0, 2] = mask[1, 0] = True  # indices 2, 3 and 5 in row-major order
    assert rle.encode(mask) == "2 2 5 1"
    assert rle.decode("2 2 5 1", (3, 4)).tolist() == mask.tolist()


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_encode_then_decode_gives_the_mask_back(mask):
    assert np.array_equal(rle.decode(rle.encode(mask), mask.shape), mask)


@settings(max_examples=100, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 30), st.integers(1, 30)), elements=st.integers(0, 5)))
def test_encode_labels_matches_encoding_each_label_alone(labels):
    encoded = rle.encode_labels(labels)
    assert set(encoded) == set(np.unique(labels[labels > 0]).tolist())
    for label, string in encoded.items():
        assert string == rle.encode(labels == label)


@settings(max_examples=200, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 30), st.integers(1, 30)), elements=st.integers(0, 5)))
def test_bounding_boxes_from_the_runs_are_those_of_the_pixels(labels):
    runs = rle.label_runs(labels)
    boxes = rle.bounding_boxes(runs, labels.shape[1]).tolist()
    expected = [
        [c.start, r.start, c.stop - c.start, r.stop - r.start]
        for r, c in (box for box in ndimage.find_objects(labels) if box is not None)
    ]
    assert runs.labels.tolist() == np.unique(labels[labels > 0]).tolist()
    assert boxes == expected


def test_a_run_wrapping_into_the_next_row_spans_every_column():
    labels = np.zeros((4, 6), dtype=np.int32)
    labels[1, 4:] = labels[2, :2] = 7  # one run: the end of row 1 and the start of row 2
    runs = rle.label_runs(labels)
    assert runs.lengths.tolist() == [4]
    assert rle.bounding_boxes(runs, 6).tolist() == [[0, 1, 6, 2]]


def test_empty_and_full_masks():
    assert rle.encode(np.zeros((5, 7), dtype=bool)) == ""
    assert not rle.decode("", (5, 7)).any()
    assert rle.encode(np.ones((5, 7), dtype=bool)) == "1 35"
    assert rle.decode("1 35", (5, 7)).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("1 2 3", "odd number of values"),
        ("1 2.5", "non-integer"),
        ("a 3", "non-integer"),
        ("1 0", "length 0"),
        ("1 -2", "length -2"),
        ("0 3", "starts at 0"),
        ("30 10", "past the image"),
        ("10 2 5 2", "increasing order"),
        ("5 4 7 2", "increasing order"),
        ("1 99999999999999999999", "20 digits"),  # past int64: an OverflowError before
        ("9223372036854775000 1000", "19 digits"),  # start + length wrapped around int64 and passed the checks
    ],
)
def test_malformed_rle_is_refused_with_the_problem_named(bad, message):
    with pytest.raises(InvalidRLEError, match=message):
        rle.decode(bad, (5, 7))


def test_encode_labels_handles_400_cells_of_a_full_image():
    # Speed is measured by `bench` (rle_encode_400_cells_ms), not asserted here.
    grid = np.random.default_rng(0).permutation(np.arange(1, 401)).reshape(20, 20)
    labels = grid.repeat(26, axis=0).repeat(35, axis=1).astype(np.int32)  # 520 x 700, 400 cells
    encoded = rle.encode_labels(labels)
    assert len(encoded) == 400
    decoded = np.zeros(labels.shape, dtype=np.int32)
    for label, string in encoded.items():
        decoded[rle.decode(string, labels.shape)] = label
    assert np.array_equal(decoded, labels)

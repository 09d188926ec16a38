import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from skimage.segmentation import find_boundaries

from app.ml.imageio import to_uint8
from app.ml.render import cell_colors, for_display, label_png, outlines, overlay


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

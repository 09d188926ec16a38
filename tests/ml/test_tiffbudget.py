"""A TIFF is counted from what tifffile will decode and refused before a pixel is decoded (issue 26): each hostile
file of the issue at its own size, decoded through the service's decoder, with the memory it took."""

from __future__ import annotations

import io
import tracemalloc
import zlib
from collections.abc import Callable

import imagecodecs
import numpy as np
import pytest
import tifffile

from app.ml.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageError
from app.ml.imageio import ImageLimits, check_geometry, declared_shape, decode_stack
from app.ml.tiffbudget import MAX_IFDS, MAX_SUBIFDS, SAMPLE_BYTES
from tests.ml import hostile_tiffs as hostile

NOTHING_DECODED = 8 * 1024 * 1024  # bytes a refused upload may take in Python (tracemalloc): its metadata only


def traced(decode: Callable[[], object]) -> tuple[object, int]:
    """What `decode` returned or raised, and the most memory Python and numpy held during it."""
    tracemalloc.start()
    try:
        try:
            result: object = decode()
        except Exception as exc:  # the caller asserts what it is
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


# The points 1-4 at the issue's own sizes: refused before decoding, whatever the limit.


def test_a_16x16_page_hiding_an_8000x6000_ome_image_is_counted_at_8000x6000():
    data = hostile.ome_hidden_page(8000, 6000)
    assert len(data) < 100_000
    assert declared_shape(data) == (6000, 8000, 1)  # what the pipeline checks against its limits before decoding
    for limit in (24_000_000, 1_000_000):  # the default, and a lower CELLSEG_MAX_PIXELS
        refused, peak = traced(lambda limit=limit: decode_stack(data, ImageLimits(max_pixels=limit)))
        assert isinstance(refused, ImageTooLargeError)
        assert "8000x6000 = 48,000,000 pixels" in str(refused)
        assert peak < NOTHING_DECODED


def test_an_ome_tiff_declaring_300_million_planes_is_refused_before_tifffile_lays_them_out():
    data = hostile.ome_plane_count(300_000_000)
    assert len(data) < 2_000
    refused, peak = traced(lambda: decode_stack(data))
    assert isinstance(refused, InvalidImageError) and not isinstance(refused, ImageTooLargeError)
    assert "declares 300,000,000 planes from IFD 0, beyond the file's 1 pages" in str(refused)
    assert peak < NOTHING_DECODED


def test_an_ome_image_declaring_more_pixels_than_the_limit_stops_at_its_declaration():
    xml = hostile.ome_xml(16, 16, '<TiffData IFD="0" PlaneCount="1"/>', t=200_000)
    data = hostile.write([hostile.small_page(xml)])
    assert declared_shape(data) == (16, 16, 200_000)
    refused, peak = traced(lambda: decode_stack(data))
    assert isinstance(refused, ImageTooLargeError) and "16x16 x 200,000 planes" in str(refused)
    assert peak < NOTHING_DECODED


def test_an_ome_image_must_be_the_size_of_the_page_it_starts_at():
    """Else tifffile lays out one list entry per declared pixel over the page's: 384 MB for a 1x1 page."""
    xml = hostile.ome_xml(4800, 5000, '<TiffData IFD="0" PlaneCount="1"/>')
    refused, peak = traced(lambda: decode_stack(hostile.write([hostile.Page(1, 1, [b"\x00"], description=xml)])))
    assert isinstance(refused, InvalidImageError) and "image is 4800x5000 but its TiffData's IFD 0 is 1x1" in str(
        refused
    )
    assert peak < NOTHING_DECODED


def test_a_jpeg_segment_of_too_many_scans_is_refused():
    stream = hostile.jpeg_with_header(16, 16)
    scans = stream[: stream.index(b"\xff\xd9")] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 101 + b"\xff\xd9"
    with pytest.raises(InvalidImageError, match="over 100 scans"):
        decode_stack(hostile.write([hostile.Page(16, 16, [scans], compression=7)]))


def test_samples_per_pixel_count_2400x2400_with_450_planar_samples():
    data = hostile.planar_samples(2400, 2400, 450)
    planes = -(-450 // SAMPLE_BYTES)  # 8-bit samples: 8 of them count as one plane
    assert declared_shape(data) == (2400, 2400, planes)
    with pytest.raises(ImageTooLargeError):
        check_geometry(*declared_shape(data), ImageLimits())  # the pipeline's own check, before decoding
    refused, peak = traced(lambda: decode_stack(data))
    assert isinstance(refused, ImageTooLargeError) and f"2400x2400 x {planes} planes" in str(refused)
    assert peak < NOTHING_DECODED


@pytest.mark.parametrize(
    ("make", "named"),
    [(lambda: hostile.png_strip(50_000), "PNG (34933)"), (lambda: hostile.jpeg2000_strip(2048), "JPEG2000 (34712)")],
    ids=["png-50000x50000", "jpeg2000"],
)
def test_an_image_codec_inside_a_tiff_is_refused_before_it_decodes_at_its_own_size(make, named):
    data = make()
    refused, peak = traced(lambda: decode_stack(data))
    assert isinstance(refused, UnsupportedImageError)
    assert f"compression {named} is not one we read: uncompressed, LZW, Deflate, Zstandard, PackBits or JPEG" in str(
        refused
    )
    assert peak < NOTHING_DECODED + len(data)


def test_a_jpeg_strip_whose_own_header_declares_another_size_is_refused_before_libjpeg_decodes_it():
    data = hostile.jpeg_strip_lying(30_000, 30_000)
    refused, peak = traced(lambda: decode_stack(data))
    assert isinstance(refused, InvalidImageError)
    assert "declares 30000x30000 pixels of 1 samples in its own header, not the 16x16" in str(refused)
    assert peak < NOTHING_DECODED


def test_lzma_is_not_among_the_promised_compressions():
    with pytest.raises(UnsupportedImageError, match=r"compression LZMA \(34925\) is not one we read"):
        decode_stack(tiff(np.zeros((32, 32), np.uint8), compression="lzma"))


# What the promise covers still decodes, exactly.


@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "zstd", "packbits"])
@pytest.mark.parametrize("layout", [{}, {"tile": (32, 48)}, {"rowsperstrip": 7}])
def test_the_promised_compressions_decode_in_strips_and_tiles(compression, layout):
    pixels = np.random.default_rng(1).integers(0, 65535, (70, 90)).astype(np.uint16)
    decoded = decode_stack(tiff(pixels, compression=compression, **layout)).frames[0]
    assert np.allclose(decoded, pixels / 65535.0, atol=1e-6)


@pytest.mark.parametrize("layout", [{"rowsperstrip": 16}, {"tile": (32, 32)}, {}])
@pytest.mark.parametrize("samples", [1, 3])
def test_jpeg_strips_and_tiles_with_a_short_last_strip_or_edge_tiles_decode(layout, samples):
    gray = np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (70, 1))  # 70 rows: the last 16-row strip holds 6
    pixels = gray if samples == 1 else np.stack([gray] * 3, -1)
    decoded = decode_stack(tiff(pixels, compression="jpeg", **layout)).frames[0]
    assert np.abs(decoded - gray / 255.0).mean() < 0.02


def test_a_deflate_strip_that_inflates_past_its_strip_is_cut_at_the_strips_size():
    bomb = zlib.compress(bytes(200_000_000), 9)  # 200 MB of zeros in 194 KB, as the strip of a 256x256 page
    data = hostile.write([hostile.Page(256, 256, [bomb], compression=8)])
    del bomb
    decoded, peak = traced(lambda: decode_stack(data))
    assert not isinstance(decoded, Exception) or isinstance(decoded, InvalidImageError)
    assert peak < NOTHING_DECODED


def test_a_zstandard_strip_that_inflates_past_its_strip_is_refused_within_the_strips_size():
    bomb = imagecodecs.zstd_encode(bytes(100_000_000))
    data = hostile.write([hostile.Page(256, 256, [bomb], compression=50000)])
    refused, peak = traced(lambda: decode_stack(data))
    assert isinstance(refused, InvalidImageError)
    assert peak < NOTHING_DECODED


# Point 8: values that reached the code unchecked answer a 4xx now.


@pytest.mark.parametrize("bits", [0, 128])
def test_bits_per_sample_tifffile_cannot_decode_are_refused(bits):
    with pytest.raises(UnsupportedImageError, match=f"samples \\({bits}-bit, SampleFormat 1\\) are not a type we read"):
        decode_stack(hostile.bits_per_sample(bits))


def test_tifffile_shaped_axes_repeating_an_axis_are_refused():
    with pytest.raises(InvalidImageError, match=r"axes 'YYX' .* do not name Y and X once each"):
        decode_stack(hostile.shaped_axes("YYX"))


@pytest.mark.parametrize("order", ["XYZZT", "XYXYT"])
def test_an_ome_dimension_order_that_is_not_a_permutation_is_refused(order):
    with pytest.raises(InvalidImageError, match=f"DimensionOrder '{order}' is not one of"):
        decode_stack(hostile.ome_dimension_order(order))


@pytest.mark.parametrize("channel", ["²", "¹", "①", "፩", "⁰", "٠"])
def test_a_channel_of_digits_int_cannot_read_is_not_in_the_image(channel):
    with pytest.raises(InvalidImageError, match=f"channel={channel!r} is not in this image: it has 2 channels"):
        decode_stack(hostile.two_channels(), channel=channel)


# The file's structure, before tifffile reads it.


def test_ifds_that_loop_are_refused():
    data = bytearray(hostile.write([hostile.small_page(), hostile.small_page()]))
    data[-4:] = data[4:8]  # the second IFD, written last, points back at the first
    with pytest.raises(InvalidImageError, match="IFDs loop"):
        decode_stack(bytes(data))


def test_more_pages_than_the_limit_could_hold_stop_the_count():
    data = hostile.write([hostile.small_page() for _ in range(50)])
    assert declared_shape(data, ImageLimits(max_pixels=16 * 16 * 40)) == (16, 16, 41)
    with pytest.raises(ImageTooLargeError):
        decode_stack(data, ImageLimits(max_pixels=16 * 16 * 40))
    assert len(decode_stack(data, ImageLimits(max_pixels=16 * 16 * 50)).frames) == 50


def test_more_than_10000_pages_are_refused_whatever_their_pixels():
    data = hostile.write([hostile.Page(16, 16, [bytes(256)]) for _ in range(MAX_IFDS + 1)])
    assert declared_shape(data) is None  # the pipeline admits nothing for it: decoding refuses it at once
    refused, peak = traced(lambda: decode_stack(data))
    assert isinstance(refused, ImageTooLargeError) and "more than 10,000 pages" in str(refused)
    assert peak < NOTHING_DECODED


def test_too_many_subifds_are_refused():
    page = hostile.small_page()
    page.tags[330] = (hostile.LONG, [8] * (MAX_SUBIFDS + 1))
    with pytest.raises(InvalidImageError, match="SubIFDs"):
        decode_stack(hostile.write([page]))


def test_fewer_strips_than_the_pages_size_needs_are_refused():
    page = hostile.Page(16, 16, [bytes(16 * 8)], rows_per_strip=8)  # 16 rows of 8 need 2 strips (tifffile drops more)
    with pytest.raises(InvalidImageError, match="holds 1 strips or tiles where its size needs 2"):
        decode_stack(hostile.write([page]))


def test_a_tile_far_larger_than_its_image_is_refused():
    page = hostile.Page(16, 16, [zlib.compress(bytes(4096 * 4096))], compression=8, tile=(4096, 4096))
    refused, peak = traced(lambda: decode_stack(hostile.write([page])))
    assert isinstance(refused, InvalidImageError) and "tiles (4096x4096) are larger than its image" in str(refused)
    assert peak < NOTHING_DECODED


def test_an_oversized_description_is_refused_before_tifffile_parses_it():
    page = hostile.small_page('{"shape": [' + "1," * 600_000 + "1]}")
    with pytest.raises(ImageTooLargeError, match="ImageDescription is"):
        decode_stack(hostile.write([page]))


def test_an_ome_modulo_annotation_over_a_huge_range_is_refused_before_tifffile_expands_it():
    modulo = (
        '<StructuredAnnotations><XMLAnnotation ID="Annotation:0" Namespace="openmicroscopy.org/omero/dimension/modulo">'
        '<Value><Modulo namespace="http://www.openmicroscopy.org/Schemas/Additions/2011-09">'
        '<ModuloAlongZ Type="other" Start="0" End="1e12" Step="1e-9"/></Modulo></Value></XMLAnnotation>'
        "</StructuredAnnotations></OME>"
    )
    xml = hostile.ome_xml(16, 16, '<TiffData IFD="0" PlaneCount="1"/>').replace("</OME>", modulo)
    refused, peak = traced(lambda: decode_stack(hostile.write([hostile.small_page(xml)])))
    assert isinstance(refused, InvalidImageError) and "modulo annotation" in str(refused)
    assert peak < NOTHING_DECODED


def test_ome_xml_of_too_many_elements_is_refused_before_it_is_parsed():
    xml = hostile.ome_xml(16, 16, '<TiffData IFD="0" PlaneCount="1"/>' + "<a/>" * 60_000)
    with pytest.raises(InvalidImageError, match="OME-XML has over 50,000 elements"):
        decode_stack(hostile.write([hostile.small_page(xml)]))


def test_ome_xml_never_opens_another_file(tmp_path):
    """An OME-TIFF may name the files that hold its planes; an upload's never opens one on the server."""
    secret = tmp_path / "secret.ome.tif"
    secret.write_bytes(tiff(np.full((16, 16), 200, np.uint8)))
    tiff_data = f'<TiffData IFD="0" PlaneCount="1"><UUID FileName="{secret}">urn:uuid:1</UUID></TiffData>'
    xml = hostile.ome_xml(16, 16, tiff_data)
    stack = decode_stack(hostile.write([hostile.small_page(xml)]))
    assert np.allclose(stack.frames[0].ravel(), np.arange(256) / 255.0)  # the upload's own page


# How samples count.


@pytest.mark.parametrize(
    ("dtype", "samples", "planes"),
    [(np.uint8, 3, 1), (np.uint16, 4, 1), (np.float64, 1, 1), (np.float32, 3, 2), (np.uint8, 20, 3)],
)
def test_a_pixel_counts_once_up_to_8_bytes_of_samples(dtype, samples, planes):
    shape = (32, 32, samples) if samples > 1 else (32, 32)
    extra = {"photometric": "rgb" if samples in (3, 4) else "minisblack", "planarconfig": "contig"}
    if samples not in (1, 3, 4):
        extra["extrasamples"] = [0] * (samples - 1)
    data = tiff(np.zeros(shape, dtype), **extra)
    assert declared_shape(data) == (32, 32, planes)

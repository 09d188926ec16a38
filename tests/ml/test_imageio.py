import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from app.ml.errors import ImageTooLargeError, InvalidImageError
from app.ml.imageio import FrameLayout, ImageLimits, decode_image, decode_stack


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which carries almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


GRAY8 = np.random.default_rng(0).integers(0, 256, (40, 50)).astype(np.uint8)


def test_8_bit_png_becomes_floats_in_unit_range():
    image = decode_image(encode(GRAY8, "PNG"))
    assert image.dtype == np.float32 and image.shape == (40, 50)
    assert np.allclose(image, GRAY8 / 255.0)


def test_16_bit_png_and_tiff_keep_their_precision():
    gray16 = GRAY8.astype(np.uint16) * 257
    assert np.allclose(decode_image(encode(gray16, "PNG")), GRAY8 / 255.0, atol=1e-6)
    assert np.allclose(decode_image(tiff(gray16)), GRAY8 / 255.0, atol=1e-6)


def test_rgb_rgba_and_16_bit_rgb_tiff_become_luminance():
    rgb = np.stack([GRAY8, GRAY8, GRAY8], axis=-1)
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 128, np.uint8)], axis=-1)
    planar = tiff(np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    for data in (encode(rgb, "PNG"), encode(rgba, "PNG"), tiff(rgb.astype(np.uint16) * 257), planar):
        assert np.allclose(decode_image(data), GRAY8 / 255.0, atol=1e-5)


def test_jpeg_is_read():
    image = decode_image(encode(GRAY8, "JPEG", quality=95))
    assert image.shape == (40, 50) and np.abs(image - GRAY8 / 255.0).mean() < 0.05


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the file is empty"),
        (b"hello, this is text", "not an image we can read"),
        (encode(GRAY8, "PNG")[:200], "truncated or corrupt"),
        (encode(np.zeros((1, 1), np.uint8), "PNG"), "1x1, too small"),
        (tiff(np.zeros((3, 40, 50), np.uint8), photometric="minisblack"), "3 frames"),
        (encode(GRAY8, "GIF"), "GIF images are not supported"),
    ],
)
def test_bad_images_are_refused_with_the_reason_and_what_is_accepted(data, message):
    with pytest.raises(InvalidImageError, match=message) as info:
        decode_image(data)
    assert "Accepted: one PNG, JPEG or TIFF image" in str(info.value)


def test_a_header_declaring_100000x100000_pixels_is_refused_before_decoding():
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match="declares 100000x100000 = 10,000,000,000 pixels"):
        decode_image(bomb)


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one page declares width x height 8-bit pixels but holds a single strip of 8 bytes."""
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 8),
    ]
    ifd_offset = 16
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + bytes(8) + struct.pack("<H", len(tags)) + entries + bytes(4)


def test_a_tiff_declaring_huge_dimensions_is_refused_before_decoding():
    bomb = tiff_header_only(60_000, 60_000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        decode_image(bomb)


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd", "packbits"])
@pytest.mark.parametrize("tiled", [False, True])
def test_tiffs_in_every_common_compression_are_read_exactly(compression, tiled):
    pixels = np.random.default_rng(6).integers(0, 256, (96, 128)).astype(np.uint8)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, compression=compression, **({"tile": (32, 32)} if tiled else {}))
    assert np.allclose(decode_image(buffer.getvalue()), pixels / 255.0, atol=1 / 255)


def test_jpeg_compressed_and_bigtiff_files_are_read():
    pixels = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (96, 1))
    jpeg, big = io.BytesIO(), io.BytesIO()
    tifffile.imwrite(jpeg, pixels, compression="jpeg")
    tifffile.imwrite(big, pixels.astype(np.uint16) * 257, bigtiff=True, compression="lzw")
    assert np.abs(decode_image(jpeg.getvalue()) - pixels / 255.0).mean() < 0.02
    assert np.allclose(decode_image(big.getvalue()), pixels / 255.0, atol=1e-6)


def test_a_gray_image_accepts_channel_0_only_and_rgb_takes_a_colour_by_name():
    assert decode_stack(tiff(GRAY8), channel="0").layout.channel == "0"
    with pytest.raises(InvalidImageError, match=r"channel='1' is not in this image: it has 1 channel, 0\.\.0"):
        decode_stack(tiff(GRAY8), channel="1")
    rgb = np.stack([np.zeros_like(GRAY8), GRAY8, np.zeros_like(GRAY8)], axis=-1)
    for data in (encode(rgb, "PNG"), tiff(rgb)):
        green = decode_stack(data, channel="Green")
        assert green.layout.channel == "green" and np.allclose(green.frames[0], GRAY8 / 255.0)


def test_a_time_lapse_of_two_channels_gives_one_frame_per_time_point_of_the_chosen_channel():
    phase, other = GRAY8.astype(np.uint16) * 257, np.full_like(GRAY8, 7, dtype=np.uint16)
    movie = np.stack([np.stack([phase, other]), np.stack([phase[::-1], other])])  # T=2, C=2
    stack = decode_stack(tiff(movie, imagej=True, metadata={"axes": "TCYX"}), channel="0")
    assert stack.layout == FrameLayout("T", (2,), "0")
    assert np.allclose(stack.frames[1], GRAY8[::-1] / 255.0, atol=1e-6)
    with pytest.raises(InvalidImageError, match="the image is a stack of 2 frames"):
        decode_image(tiff(movie, imagej=True, metadata={"axes": "TCYX"}), channel="0")


def test_every_plane_counts_against_the_pixel_limit():
    stack = tiff(np.zeros((5, 40, 50), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    assert len(decode_stack(stack, ImageLimits(max_pixels=5 * 40 * 50)).frames) == 5
    with pytest.raises(ImageTooLargeError, match="50x40 x 5 planes = 10,000 pixels, over the limit of 9,999"):
        decode_stack(stack, ImageLimits(max_pixels=9_999))

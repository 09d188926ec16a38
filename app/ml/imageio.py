"""Decode uploaded bytes into one grayscale float image, refusing anything unsafe before allocating it.

PNG and JPEG go through Pillow, TIFF through tifffile (it reads 16-bit RGB, float and scientific TIFF that
Pillow cannot). Every reader looks at the header first: dimensions and frame count are checked before any
pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from app.ml.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageError

MAX_PIXELS = 24_000_000  # sized to fit the service in a 2 GB container: docs/reliability.md
MIN_SIDE = 16
ACCEPTED = (
    "Accepted: one PNG, JPEG or TIFF image, 8- or 16-bit, grayscale, RGB or RGBA, a single frame, "
    f"at least {MIN_SIDE}x{MIN_SIDE} pixels and at most the service's pixel limit."
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, what Pillow's "L" uses

# Our own limit (ImageLimits) is checked from the header with a message that says what is accepted;
# Pillow's built-in bomb check would fire first, with a message of its own, so it is handed over to ours.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may declare, checked from its header."""

    max_pixels: int = MAX_PIXELS
    min_side: int = MIN_SIDE


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Image file bytes -> (H, W) float32 in [0, 1], grayscale. Raises InvalidImageError / ImageTooLargeError."""
    if not data:
        raise InvalidImageError(f"the file is empty. {ACCEPTED}")
    if data[:4] in _TIFF_MAGIC:
        return _decode_tiff(data, limits)
    return _decode_with_pillow(data, limits)


def read_image(path: str | Path, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Image file path -> (H, W) float32 in [0, 1]; the same decoder the service uses."""
    return decode_image(Path(path).read_bytes(), limits)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header only."""
    shape = declared_shape(Path(path).read_bytes())
    if shape is None:
        raise UnsupportedImageError(f"{path}: no PNG, JPEG or TIFF header could be read. {ACCEPTED}")
    return shape[0], shape[1]


def declared_shape(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, frames) as the image file's header declares them, without decoding any pixel; None when
    the header cannot be read (decoding the file then says what is wrong)."""
    try:
        if data[:4] in _TIFF_MAGIC:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth), _tiff_frames(tif)
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width, getattr(img, "n_frames", 1)
    except Exception:
        return None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W) uint8, for writing PNGs."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def check_geometry(height: int, width: int, frames: int, limits: ImageLimits) -> None:
    """InvalidImageError (ImageTooLargeError when too large) for a shape the limits refuse."""
    if frames > 1:
        raise InvalidImageError(f"the image has {frames} frames; send one frame per image. {ACCEPTED}")
    if height * width > limits.max_pixels:
        raise ImageTooLargeError(
            f"the image declares {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,}. {ACCEPTED}"
        )
    if min(height, width) < limits.min_side:
        raise InvalidImageError(f"the image is {width}x{height}, too small to segment. {ACCEPTED}")


def _decode_with_pillow(data: bytes, limits: ImageLimits) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in {"PNG", "JPEG", "MPO"}:
            raise UnsupportedImageError(f"{img.format} images are not supported. {ACCEPTED}")
        check_geometry(img.height, img.width, getattr(img, "n_frames", 1), limits)
        img.load()
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(f"the file is not an image we can read. {ACCEPTED}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"the image is truncated or corrupt ({exc}). {ACCEPTED}") from exc
    return _pillow_to_gray(img)


def _pillow_to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in {"I;16", "I;16B", "I;16L", "I"}:
        return _array_to_gray(np.asarray(img))
    if img.mode not in {"L", "RGB", "RGBA", "LA", "P", "1", "CMYK", "YCbCr"}:
        raise UnsupportedImageError(f"image mode {img.mode} is not supported. {ACCEPTED}")
    if img.mode in {"P", "CMYK", "YCbCr", "1"}:
        img = img.convert("RGB")
    if img.mode == "LA":
        img = img.getchannel(0)
    return _array_to_gray(np.asarray(img))


def _decode_tiff(data: bytes, limits: ImageLimits) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            check_geometry(int(page.imagelength), int(page.imagewidth), _tiff_frames(tif), limits)
            pixels = page.asarray()
            if page.samplesperpixel > 1 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                pixels = np.moveaxis(pixels, 0, -1)
    except InvalidImageError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files; all mean "not readable"
        if "imagecodecs" in str(exc):  # a codec this installation lacks: the file is fine
            raise UnsupportedImageError(f"this TIFF's compression cannot be decoded here ({exc}). {ACCEPTED}") from exc
        raise InvalidImageError(f"the TIFF is truncated or corrupt ({exc}). {ACCEPTED}") from exc
    return _array_to_gray(pixels)


def _tiff_frames(tif: tifffile.TiffFile) -> int:
    """Pages, or planes of a stack stored in one page: every axis but height, width and samples."""
    frames = len(tif.pages)
    for series in tif.series[:1]:
        planes = [size for size, axis in zip(series.shape, series.axes, strict=True) if axis not in "YXS"]
        frames = max(frames, int(np.prod(planes)) if planes else 1)
    return frames


def _array_to_gray(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) integer or float array -> (H, W) float32 in [0, 1]."""
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        scaled = _scale_to_unit(pixels[..., :3])
        return np.ascontiguousarray(scaled @ _LUMA, dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 2):
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise InvalidImageError(f"the image has shape {pixels.shape}; expected one 2-D frame. {ACCEPTED}")
    return _scale_to_unit(pixels)


def _scale_to_unit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.bool_:
        return pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.integer):
        top = np.iinfo(pixels.dtype).max
        if pixels.dtype in (np.int32, np.uint32, np.int64, np.uint64):
            # Pillow stores 16-bit PNGs as int32 ("I" mode): use the range the values can really take.
            top = 65535 if pixels.max(initial=0) <= 65535 else top
        return np.clip(pixels.astype(np.float32) / np.float32(top), 0.0, 1.0)
    pixels = pixels.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise InvalidImageError(f"the image contains NaN or infinite values. {ACCEPTED}")
    low, high = float(pixels.min()), float(pixels.max())
    return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)

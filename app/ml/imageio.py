"""Decode uploaded bytes into grayscale float frames, refusing anything unsafe before allocating it.

PNG and JPEG go through Pillow, TIFF through tifffile with imagecodecs (the compressions the README promises,
OME-TIFF and ImageJ hyperstacks with their axes, 16-bit, float). Every reader looks at the header first: dimensions
and planes are checked before any pixel is decoded, so a decompression bomb costs nothing. For a TIFF, "the header"
is what tifffile will decode: its series, every page and sample of it, and every strip or tile (app.ml.tiffbudget).

A TIFF's axes decide what its planes are: Y and X are the image; C (channels) or S (samples, such as RGB) are
reduced to one gray plane (the chosen channel, or the luminance of RGB); every other axis (Z, T, pages...) makes
frames, each segmented on its own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from app.ml import tiffbudget
from app.ml.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageError

MAX_PIXELS = 24_000_000  # sized to fit the service in a 2 GB container: docs/reliability.md
MIN_SIDE = 16
MAX_CHANNEL_NAME = 100  # characters; the longest `channel=` a request may send
LISTED_CHANNELS = 20  # an error lists this many channels of a file, and how many more
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")  # the files a folder of images is read for
ACCEPTED = (
    "Accepted: one PNG, JPEG or TIFF image (TIFF also as a Z or time stack, OME-TIFF or ImageJ hyperstack), "
    f"8-, 16-bit or float, grayscale, RGB or RGBA, at least {MIN_SIDE}x{MIN_SIDE} pixels and at most the service's "
    "pixel limit in all its planes."
)
_RGB_NAMES = ("red", "green", "blue", "alpha")
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


@dataclass(frozen=True)
class FrameLayout:
    """How the frames of one image file were laid out in it, which the files written back keep."""

    axes: str  # the file's frame axes in order, e.g. "TZ" (tifffile's letters); "" for a single image
    frame_shape: tuple[int, ...]  # the size of each frame axis: their product is the number of frames
    channel: str | None  # the channel the frames were taken from, by name where the file names it

    @property
    def is_stack(self) -> bool:
        return bool(self.axes)


@dataclass(frozen=True)
class ImageStack:
    """The frames of one image file, each a gray image to segment on its own."""

    frames: np.ndarray  # (N, H, W) float32 in [0, 1]
    layout: FrameLayout


def decode_stack(data: bytes, limits: ImageLimits = ImageLimits(), channel: str | None = None) -> ImageStack:
    """Image file bytes -> its frames, of `channel` (an index or a name) where it has several channels.
    Raises InvalidImageError / ImageTooLargeError / UnsupportedImageError with what is wrong and what is accepted."""
    if not data:
        raise InvalidImageError(f"the file is empty. {ACCEPTED}")
    if data[:4] in _TIFF_MAGIC:
        return _decode_tiff(data, limits, channel)
    return _decode_with_pillow(data, limits, channel)


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), channel: str | None = None) -> np.ndarray:
    """Image file bytes -> (H, W) float32 in [0, 1]; a stack of several frames is refused."""
    stack = decode_stack(data, limits, channel)
    if len(stack.frames) > 1:
        raise InvalidImageError(
            f"the image is a stack of {len(stack.frames)} frames (axes {stack.layout.axes}); send one frame per image "
            f"here (the service segments stacks frame by frame). {ACCEPTED}"
        )
    return stack.frames[0]


def read_image(path: str | Path, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Image file path -> (H, W) float32 in [0, 1]; the same decoder the service uses."""
    return decode_image(Path(path).read_bytes(), limits)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header only."""
    shape = declared_shape(Path(path).read_bytes())
    if shape is None:
        raise UnsupportedImageError(f"{path}: no PNG, JPEG or TIFF header could be read. {ACCEPTED}")
    return shape[0], shape[1]


def declared_shape(data: bytes, limits: ImageLimits | None = None) -> tuple[int, int, int] | None:
    """(height, width, planes) that decoding the image file will allocate, without decoding any pixel; None when
    it cannot be read (decoding the file then says what is wrong). Planes counts frames and channels (and, in a
    TIFF, samples beyond tiffbudget.SAMPLE_BYTES per pixel): check_geometry counts height x width x planes. A TIFF is
    counted from the series tifffile will decode, not its first page; `limits` bounds the work of counting it."""
    try:
        if data[:4] in _TIFF_MAGIC:
            shape = tiffbudget.declared_tiff_shape(data, (limits or ImageLimits()).max_pixels)
            return shape.height, shape.width, shape.planes
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width, getattr(img, "n_frames", 1)
    except Exception:
        return None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W) uint8, for writing PNGs."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def check_geometry(height: int, width: int, planes: int, limits: ImageLimits) -> None:
    """InvalidImageError (ImageTooLargeError when too large) for a shape the limits refuse; every plane of a stack
    counts against the pixel limit, as every plane is decoded."""
    if height * width * planes > limits.max_pixels:
        in_planes = f" x {planes:,} planes" if planes > 1 else ""
        raise ImageTooLargeError(
            f"the image declares {width}x{height}{in_planes} = {width * height * planes:,} pixels, over the limit "
            f"of {limits.max_pixels:,}. {ACCEPTED}"
        )
    if min(height, width) < limits.min_side:
        raise InvalidImageError(f"the image is {width}x{height}, too small to segment. {ACCEPTED}")


def _decode_with_pillow(data: bytes, limits: ImageLimits, channel: str | None) -> ImageStack:
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in {"PNG", "JPEG", "MPO"}:
            raise UnsupportedImageError(f"{img.format} images are not supported. {ACCEPTED}")
        if getattr(img, "n_frames", 1) > 1:
            raise InvalidImageError(f"the {img.format} has {img.n_frames} frames; send a stack as a TIFF. {ACCEPTED}")
        check_geometry(img.height, img.width, 1, limits)
        img.load()
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(f"the file is not an image we can read. {ACCEPTED}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"the image is truncated or corrupt ({exc}). {ACCEPTED}") from exc
    pixels = _pillow_pixels(img)
    axes = "YXS" if pixels.ndim == 3 else "YX"
    return _frames(pixels, axes, channel, _RGB_NAMES if pixels.ndim == 3 else ())


def _pillow_pixels(img: Image.Image) -> np.ndarray:
    if img.mode in {"I;16", "I;16B", "I;16L", "I"}:
        return np.asarray(img)
    if img.mode not in {"L", "RGB", "RGBA", "LA", "P", "1", "CMYK", "YCbCr"}:
        raise UnsupportedImageError(f"image mode {img.mode} is not supported. {ACCEPTED}")
    if img.mode in {"P", "CMYK", "YCbCr", "1"}:
        img = img.convert("RGB")
    if img.mode == "LA":
        img = img.getchannel(0)
    return np.asarray(img)


def _decode_tiff(data: bytes, limits: ImageLimits, channel: str | None) -> ImageStack:
    def admit(shape: tiffbudget.TiffShape) -> None:
        check_geometry(shape.height, shape.width, shape.planes, limits)

    try:
        with tiffbudget.opened(data, limits.max_pixels, admit) as tiff:
            pixels, axes = tiff.decode(), tiff.axes
            names = _ome_channel_names(tiff.tif) if "C" in axes else _RGB_NAMES if "S" in axes else ()
    except InvalidImageError as exc:
        if ACCEPTED in str(exc):
            raise
        raise type(exc)(f"{exc}. {ACCEPTED}") from exc
    except Exception as exc:  # tifffile raises many types for broken files; all mean "not readable"
        if "imagecodecs" in str(exc):  # a codec this installation lacks: the file is fine
            raise UnsupportedImageError(f"this TIFF's compression cannot be decoded here ({exc}). {ACCEPTED}") from exc
        raise InvalidImageError(f"the TIFF is truncated or corrupt ({exc}). {ACCEPTED}") from exc
    return _frames(pixels, axes, channel, names)


def _ome_channel_names(tif: tifffile.TiffFile) -> tuple[str, ...]:
    """The channels' names in an OME-TIFF's metadata (those without one by index); () for other TIFFs."""
    if not tif.is_ome or not tif.ome_metadata:
        return ()
    image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    return tuple(_shortened(str(c.get("Name") or index)) for index, c in enumerate(channels))


def _shortened(name: str) -> str:
    """A channel's name as far as a request can name it (`channel=` takes MAX_CHANNEL_NAME characters): a file's
    name of megabytes is not echoed back in errors and headers."""
    return name if len(name) <= MAX_CHANNEL_NAME else name[: MAX_CHANNEL_NAME - 1] + "…"


def _frames(pixels: np.ndarray, axes: str, channel: str | None, names: tuple[str, ...]) -> ImageStack:
    """An array with tifffile's axis letters -> gray frames: the chosen channel (or RGB's luminance) of every
    plane; every axis but Y, X, C and S is a frame axis."""
    if "Y" not in axes or "X" not in axes:
        raise InvalidImageError(f"the image has axes {axes!r} without both Y and X. {ACCEPTED}")
    frame_axes = "".join(a for a in axes if a not in "YXCS")
    rest = "".join(a for a in axes if a in "CS")  # kept last, in the file's order
    pixels = np.moveaxis(pixels, [axes.index(a) for a in frame_axes + "YX" + rest], range(len(axes)))
    frame_shape = pixels.shape[: len(frame_axes)]
    pixels = pixels.reshape(-1, *pixels.shape[len(frame_axes) :])  # (frames, Y, X, *rest)
    pixels, taken = _pick_channel(pixels, rest, channel, names)
    layout = FrameLayout(frame_axes, frame_shape, taken)
    if pixels.ndim == 4:  # RGB(A) samples left: their luminance
        return ImageStack(_luminance(pixels[..., :3]), layout)
    frames = np.empty(pixels.shape, np.float32)  # filled frame by frame: one frame's floats at a time beside it
    for index, frame in enumerate(pixels):
        frames[index] = _scale_to_unit(frame)
    return ImageStack(frames, layout)


def _pick_channel(
    pixels: np.ndarray, rest: str, channel: str | None, names: tuple[str, ...]
) -> tuple[np.ndarray, str | None]:
    """(frames, Y, X, *rest) -> (frames, Y, X), or (frames, Y, X, 3|4) for RGB(A) left for its luminance: the
    chosen channel, else the only one; several channels and no choice is an error, RGB excepted."""
    channel_axis = "C" if "C" in rest else "S" if "S" in rest else ""
    count = pixels.shape[3 + rest.index(channel_axis)] if channel_axis else 1
    is_rgb = channel_axis == "S" and count in (3, 4)
    if channel is None and count > 1 and channel_axis == "C":
        shown = min(count, LISTED_CHANNELS)
        listed = ", ".join(
            f"{i} ({names[i]})" if i < len(names) and names[i] != str(i) else str(i) for i in range(shown)
        ) + (f", ... ({count - shown} more)" if count > shown else "")
        raise InvalidImageError(f"the image has {count} channels: {listed}; choose one with channel=<index or name>")
    index = None if channel is None else _channel_index(channel, count, names)
    for axis in reversed(rest):  # the last axis first, so the position of the one before stays right
        position = 3 + rest.index(axis)
        if axis == channel_axis and index is not None:
            pixels = np.take(pixels, index, axis=position)
        elif not (axis == "S" and pixels.shape[position] in (3, 4)):
            pixels = np.take(pixels, 0, axis=position)  # a lone channel, or the gray of gray + alpha
    taken = None if index is None else (names[index] if is_rgb or index < len(names) else str(index))
    return pixels, taken


def _channel_index(channel: str, count: int, names: tuple[str, ...]) -> int:
    lowered = [name.lower() for name in names[:count]]
    if channel.lower() in lowered:
        return lowered.index(channel.lower())
    if channel.isascii() and channel.isdigit() and int(channel) < count:  # not "²": isdigit() yet not int()
        return int(channel)
    named, shown = names[:count], names[: min(count, LISTED_CHANNELS)]
    known = f" ({', '.join(shown)}{', ...' * (len(named) > len(shown))})" if names else ""
    raise InvalidImageError(
        f"channel={channel!r} is not in this image: it has {count} channel{'s' * (count > 1)}, 0..{count - 1}{known}"
    )


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) float32 luminance in [0, 1], the three scaled as one; one colour's floats at a time."""
    low, span = _unit_range(rgb)
    gray = np.zeros(rgb.shape[:-1], np.float32)
    if span == 0:
        return gray
    for index, weight in enumerate(_LUMA):
        channel = _to_unit(rgb[..., index], low, span)
        channel *= weight
        gray += channel
    return gray


def _scale_to_unit(pixels: np.ndarray) -> np.ndarray:
    low, span = _unit_range(pixels)
    return _to_unit(pixels, low, span) if span else np.zeros(pixels.shape, np.float32)


def _to_unit(pixels: np.ndarray, low: float, span: float) -> np.ndarray:
    unit = pixels.astype(np.float32)
    if low:
        unit -= low
    if span != 1:
        unit /= np.float32(span) if np.issubdtype(pixels.dtype, np.integer) else span
    return np.clip(unit, 0.0, 1.0, out=unit)


def _unit_range(pixels: np.ndarray) -> tuple[float, float]:
    """(low, span) that map the pixels to [0, 1] as (pixels - low) / span, then clipped; span 0: all zero.
    Integers: their type's range; floats already in [0, 1]: as they are; other floats: their own minimum to
    maximum."""
    if pixels.dtype == np.bool_:
        return 0.0, 1.0
    if np.issubdtype(pixels.dtype, np.integer):
        top = np.iinfo(pixels.dtype).max
        if pixels.dtype in (np.int32, np.uint32, np.int64, np.uint64):
            # Pillow stores 16-bit PNGs as int32 ("I" mode): use the range the values can really take.
            top = 65535 if pixels.max(initial=0) <= 65535 else top
        return 0.0, float(top)
    with np.errstate(over="ignore"):  # the range as float32, which the pixels become: beyond it is infinite
        low, high = float(np.float32(pixels.min())), float(np.float32(pixels.max()))
    if not (np.isfinite(low) and np.isfinite(high)):  # NaN too: min and max carry it
        raise InvalidImageError(f"the image contains NaN or infinite values. {ACCEPTED}")
    if low >= 0.0 and high <= 1.0:  # already in [0, 1], the usual float convention: kept, as 8-bit / 255 would be
        return 0.0, 1.0
    return (low, high - low) if high > low else (0.0, 0.0)

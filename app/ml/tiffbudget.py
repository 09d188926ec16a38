"""What a TIFF will cost to decode, counted before any pixel is decoded, and the decoding of exactly that.

A TIFF's first page says little about what tifffile decodes: an OME-TIFF's XML can point a series at any page and
declare any number of planes, a page can hold hundreds of samples per pixel, and a strip or tile can hold an image
codec's stream of any size. So the budget is computed from the series tifffile will decode (its shape, all its pages,
their samples and sample type), after checks that keep tifffile's own reading of the file cheap:

1. The file's structure, walked here first (`_Structure`): a bounded number of IFDs, no IFD loops, a bounded number
   of tag values tifffile keeps as Python tuples, a bounded ImageDescription (tifffile parses it as OME-XML, JSON or
   ImageJ text).
2. The OME-XML, checked here before tifffile reads it: valid DimensionOrder, sizes, TiffData within the file and
   images the size of the pages they start at, so that tifffile allocates nothing in proportion to a declared
   number. Images declaring more than the limit stop here with their declared size.
3. The series: unique axes with Y and X, a sample type we read, every page decoded with the series' own geometry.
4. Every page decoded: a compression the README promises (uncompressed, LZW, Deflate, Zstandard, PackBits, JPEG),
   the strip or tile count its geometry implies, segments no larger than their pixels could need, and JPEG
   segments whose own header declares the strip's or tile's size (libjpeg decodes a JPEG at its header's size).

LZW, Deflate, Zstandard and PackBits segments are decoded by tifffile into a buffer of the segment's size, so a
segment that would inflate further is cut there (bounded, and then refused as corrupt). The file is opened alone
(an OME-XML naming other files never opens them) and read as tifffile's shaped, ImageJ or OME layout, or as plain
pages; the other layouts tifffile knows (LSM, NDPI, SVS, Micro-Manager...) are read as plain pages.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from xml.etree import ElementTree

import numpy as np
import tifffile

from app.ml.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageError

COMPRESSIONS = {
    1: "uncompressed",
    5: "LZW",
    8: "Deflate",
    32946: "Deflate",
    50000: "Zstandard",
    34926: "Zstandard",
    32773: "PackBits",
    7: "JPEG",
}
PROMISED = "uncompressed, LZW, Deflate, Zstandard, PackBits or JPEG"
# One pixel may hold this many bytes of samples and count once against the pixel limit: gray of any type up to
# float64, RGB(A) up to 16-bit. Beyond it a pixel counts as several planes (450 samples of 8 bits: 57 planes).
SAMPLE_BYTES = 8
# Pages (and SubIFDs) in one file: tifffile spends ~30 us listing each and ~50 us decoding it beside its pixels,
# so 10,000 keep one upload's counting and decoding to about a second (docs/reliability.md).
MAX_IFDS = 10_000
MAX_SUBIFDS = 32  # pyramid levels under one page; tifffile reads each as a page
MAX_TAGS = 4096  # tags in one IFD (tifffile's own "suspicious" bound)
MAX_ARRAY_VALUES = 1_000_000  # strip and tile offsets and counts, SubIFDs...: values tifffile keeps as Python ints
MAX_DESCRIPTION = 1 << 20  # bytes of an ImageDescription, which tifffile parses (OME-XML, JSON, ImageJ text)
MAX_XML_ELEMENTS = 50_000
MAX_MODULO_LABELS = 100_000  # an OME modulo annotation's Start..End in Steps, which tifffile expands
MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10; each scan is a pass over the whole segment
SEGMENT_SLACK = 64 * 1024  # bytes a compressed strip or tile may hold beyond 4x its pixels (JPEG headers, tables)
_OTHER_LAYOUTS = "lsm mmstack ndtiff fluoview stk sis svs scn qpi ndpi bif avs eer philips scanimage nih mdgel indica"
_EXOTIC = {f"is_{kind}": False for kind in _OTHER_LAYOUTS.split() if kind in tifffile.TIFF.FILE_FLAGS}
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_OFFSET_TYPES = {4, 13, 16, 18}  # LONG, IFD, LONG8, IFD8: SubIFDs' offsets
_DIMENSION_ORDERS = {"XYZCT", "XYZTC", "XYCTZ", "XYCZT", "XYTCZ", "XYTZC"}
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3}  # baseline, extended, progressive, lossless: what libjpeg-turbo decodes
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RSTn)
_SUPPORTED_KINDS = "biuf"


@dataclass(frozen=True)
class TiffShape:
    """What decoding a TIFF allocates, in the pixel limit's terms: height x width x planes."""

    height: int
    width: int
    planes: int  # every plane decoded: frames x channels, x the sample weight (see SAMPLE_BYTES)


@dataclass(frozen=True)
class _Series:
    """The series that will be decoded, all of one shape (several are stacked along a new axis "I")."""

    series: list[tifffile.TiffPageSeries]
    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype


class _Declared(Exception):  # noqa: N818 - control flow: the file declares more than the limit before tifffile reads it
    def __init__(self, shape: TiffShape) -> None:
        super().__init__(shape)
        self.shape = shape


def declared_tiff_shape(data: bytes, max_pixels: int) -> TiffShape:
    """What decoding `data` would allocate, from its structure and metadata only; raises InvalidImageError (or a
    subclass) where the file cannot be counted or will not be decoded."""
    try:
        with _open(data, max_pixels) as (tif, structure):
            return _count(_select(tif, structure))
    except _Declared as declared:
        return declared.shape


@contextmanager
def opened(data: bytes, max_pixels: int, admit: Callable[[TiffShape], None]) -> Iterator[Decodable]:
    """The TIFF, counted and checked before `decode()` decodes a pixel: `admit` sees what decoding will allocate
    (and raises where the limits refuse it), then every page decoded is checked (InvalidImageError, or
    UnsupportedImageError for a compression or sample type we do not read)."""
    try:
        with _open(data, max_pixels) as (tif, structure):
            selected = _select(tif, structure)
            shape = _count(selected)
            admit(shape)
            for pages in _pages(selected):
                _check_pages(pages, data)
            yield Decodable(tif, selected, shape)
    except _Declared as declared:
        admit(declared.shape)
        raise ImageTooLargeError(f"the TIFF declares more than {max_pixels:,} pixels") from None


@dataclass(frozen=True)
class Decodable:
    tif: tifffile.TiffFile
    selected: _Series
    shape: TiffShape

    @property
    def axes(self) -> str:
        return self.selected.axes

    def decode(self) -> np.ndarray:
        """The pixels counted, in the series' axes; several series are decoded each into its place in one array."""
        selected = self.selected
        if len(selected.series) == 1:
            decoded = selected.series[0].asarray(buffersize=_BUFFER)
            if decoded.size != math.prod(selected.shape):
                raise InvalidImageError(f"the TIFF decoded to {decoded.shape}, not the {selected.shape} counted")
            return decoded.reshape(selected.shape)
        out = np.empty(selected.shape, selected.dtype)
        for series, part in zip(selected.series, out, strict=True):
            series.asarray(out=part, buffersize=_BUFFER)
        return out


_BUFFER = 16 << 20  # bytes tifffile reads from the file in one pass


# 1. The file's structure


@dataclass
class _Structure:
    pages: int  # IFDs in the main chain
    sizes: list[tuple[int, int]]  # (length, width) each of them declares, (0, 0) where it declares none


class _TooManyIfds(Exception):  # noqa: N818 - control flow inside _Walker
    pass


class _Walker:
    """Walks every IFD (and SubIFD) as tifffile will, refusing what would make tifffile's own reading costly: more
    IFDs than pages of the smallest image the limit admits, a loop (tifffile detects few), too many tags, too many
    values tifffile keeps as Python ints, an oversized ImageDescription."""

    def __init__(self, data: bytes, max_pixels: int) -> None:
        self.data = data
        self.max_ifds = min(max(1, max_pixels // 256), MAX_IFDS)  # an admissible page holds 16x16 pixels or more
        order = "<" if data[:2] == b"II" else ">"
        self.order, self.big = order, data[2:4] in (b"+\x00", b"\x00+")
        if self.big:
            head = _unpack(data, 4, order + "HHQ")
            if head[:2] != (8, 0):
                raise InvalidImageError("the BigTIFF header is corrupt")
            self.first = head[2]
            self.count, self.entry, self.offset = (order + "Q", 8), (order + "HHQ8s", 20), (order + "Q", 8)
        else:
            self.first = _unpack(data, 4, order + "I")[0]
            self.count, self.entry, self.offset = (order + "H", 2), (order + "HHI4s", 12), (order + "I", 4)
        self.seen: set[int] = set()
        self.array_values = 0

    def walk(self) -> _Structure:
        structure = _Structure(0, [])
        offset = self.first
        try:
            while 8 <= offset < len(self.data):  # tifffile stops at an offset outside the file too
                following, subifds, size = self.ifd(offset)
                structure.sizes.append(size)
                structure.pages += 1
                self.sub(subifds)
                offset = following
        except _TooManyIfds:
            if self.max_ifds == MAX_IFDS:
                raise ImageTooLargeError(f"the TIFF holds more than {MAX_IFDS:,} pages and SubIFDs") from None
            structure.pages = self.max_ifds + 1
        if structure.pages == 0:
            raise InvalidImageError("the TIFF has no readable IFD")
        return structure

    def sub(self, offsets: list[int]) -> None:
        for offset in offsets:
            if 8 <= offset < len(self.data):
                self.sub(self.ifd(offset)[1])

    def ifd(self, offset: int) -> tuple[int, list[int], tuple[int, int]]:
        """(the next IFD's offset, the SubIFDs' offsets, (length, width)) of the IFD at `offset`."""
        if offset in self.seen:
            raise InvalidImageError(f"the TIFF's IFDs loop (the IFD at byte {offset:,} is reached twice)")
        self.seen.add(offset)
        if len(self.seen) > self.max_ifds:
            raise _TooManyIfds
        tags = _unpack(self.data, offset, self.count[0])[0]
        if tags > MAX_TAGS:
            raise InvalidImageError(f"an IFD of the TIFF declares {tags:,} tags")
        start = offset + self.count[1]
        codes: set[int] = set()
        subifds: list[int] = []
        size = {256: 0, 257: 0}
        for index in range(tags):
            where = start + index * self.entry[1]
            code, kind, count, _ = _unpack(self.data, where, self.entry[0])
            self.tag(code, count, codes)
            value_at = self.value_at(where, kind, count)
            if code == 330 and kind in _OFFSET_TYPES:
                if count > MAX_SUBIFDS:
                    raise InvalidImageError(f"a page of the TIFF declares {count:,} SubIFDs, over {MAX_SUBIFDS}")
                subifds = list(_unpack(self.data, value_at, f"{self.order}{count}{'Q' if kind in (16, 18) else 'I'}"))
            elif code in size and count == 1 and kind in _INTEGERS:
                size[code] = _unpack(self.data, value_at, self.order + _INTEGERS[kind])[0]
        following = _unpack(self.data, start + tags * self.entry[1], self.offset[0])[0]
        return following, subifds, (size[257], size[256])

    def tag(self, code: int, count: int, codes: set[int]) -> None:
        if code in tifffile.TIFF.TAG_LOAD:  # read at once, several times if repeated
            if code in codes:
                raise InvalidImageError(f"an IFD of the TIFF repeats tag {code}")
            codes.add(code)
        if code in tifffile.TIFF.TAG_TUPLE:
            self.array_values += count
            if self.array_values > MAX_ARRAY_VALUES:
                raise InvalidImageError(f"the TIFF's strip, tile and IFD tables hold over {MAX_ARRAY_VALUES:,} values")
        if code == 270 and count > MAX_DESCRIPTION:
            raise ImageTooLargeError(f"the TIFF's ImageDescription is {count:,} bytes, over {MAX_DESCRIPTION:,}")

    def value_at(self, where: int, kind: int, count: int) -> int:
        """Where an entry's values lie: in the entry itself when they fit, else at the offset it holds."""
        inline = where + 4 + (8 if self.big else 4)
        if _TYPE_SIZES.get(kind, 0) * count <= self.offset[1]:
            return inline
        return _unpack(self.data, inline, self.offset[0])[0]


_INTEGERS = {3: "H", 4: "I", 16: "Q"}


def _unpack(data: bytes, offset: int, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise InvalidImageError(f"the TIFF is truncated (a structure at byte {offset:,} runs past its end)")
    return struct.unpack_from(fmt, data, offset)


@contextmanager
def _open(data: bytes, max_pixels: int) -> Iterator[tuple[tifffile.TiffFile, _Structure]]:
    structure = _Walker(data, max_pixels).walk()
    if structure.pages > max(1, max_pixels // 256):
        height, width = structure.sizes[0]
        raise _Declared(TiffShape(max(height, 16), max(width, 16), structure.pages))
    # One file only (OME-XML may name others: never opened here), and only the series layouts the README promises.
    with tifffile.TiffFile(io.BytesIO(data), _multifile=False, **_EXOTIC) as tif:
        if tif.is_ome:
            _check_ome(tif.pages.first.description, structure, max_pixels)
        yield tif, structure


# 2. OME-XML


def _check_ome(xml: str, structure: _Structure, max_pixels: int) -> None:
    """The OME-XML's images, checked before tifffile lays them out (tifffile allocates a list entry per plane
    declared, or per declared pixel over the size of the page the image starts at, and an array for a modulo's
    labels): InvalidImageError for what is not valid OME or does not fit the file; _Declared where the images
    declare more pixels than the limit."""
    if xml.count("<") > MAX_XML_ELEMENTS:
        raise InvalidImageError(f"the OME-XML has over {MAX_XML_ELEMENTS:,} elements")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return  # tifffile reads it as no OME, and the file as plain pages
    declared = 0
    first: TiffShape | None = None
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "Pixels":
            shape = _ome_pixels(element, structure, root.attrib.get("UUID"))
            declared += shape.height * shape.width * shape.planes
            first = first or shape
        elif tag[:-1].endswith("Along") and "Start" in element.attrib:  # ModuloAlongZ, as tifffile finds it
            _ome_modulo(element)
    if first is not None and declared > max_pixels:
        planes = math.ceil(declared / (first.height * first.width))
        raise _Declared(TiffShape(first.height, first.width, planes))


def _ome_pixels(pixels: ElementTree.Element, structure: _Structure, root_uuid: str | None) -> TiffShape:
    order = pixels.attrib.get("DimensionOrder", "")
    if order not in _DIMENSION_ORDERS:
        raise InvalidImageError(f"the OME-XML's DimensionOrder {order!r} is not one of {sorted(_DIMENSION_ORDERS)}")
    sizes = {axis: _ome_int(pixels, f"Size{axis}", 1) for axis in "XYZCT"}
    for child in pixels:
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "Channel":
            _ome_int(child, "SamplesPerPixel", 1, default=1)
        elif tag == "TiffData" and not _in_another_file(child, root_uuid):  # tifffile stops at another file's
            _ome_tiff_data(child, sizes, structure)
    return TiffShape(sizes["Y"], sizes["X"], sizes["Z"] * sizes["C"] * sizes["T"])


def _in_another_file(tiff_data: ElementTree.Element, root_uuid: str | None) -> bool:
    uuids = [child for child in tiff_data if child.tag.rsplit("}", 1)[-1] == "UUID"]
    return bool(uuids) and (root_uuid is None or uuids[0].text != root_uuid)


def _ome_tiff_data(tiff_data: ElementTree.Element, sizes: dict[str, int], structure: _Structure) -> None:
    """A TiffData of this file: its pages within the file, and the first of them the image's size."""
    ifd = _ome_int(tiff_data, "IFD", 0, default=0)
    planes = max(_ome_int(tiff_data, name, 0, default=0) for name in ("NumPlanes", "PlaneCount"))
    if ifd + max(planes, 1) > structure.pages:
        raise InvalidImageError(
            f"the OME-XML's TiffData declares {max(planes, 1):,} planes from IFD {ifd}, beyond the file's "
            f"{structure.pages:,} pages"
        )
    if structure.sizes[ifd] != (sizes["Y"], sizes["X"]):
        length, width = structure.sizes[ifd]
        raise InvalidImageError(
            f"the OME-XML's image is {sizes['X']}x{sizes['Y']} but its TiffData's IFD {ifd} is {width}x{length}"
        )
    for axis in "ZCT":
        if _ome_int(tiff_data, f"First{axis}", 0, default=0) >= sizes[axis]:
            raise InvalidImageError(
                f"the OME-XML's TiffData declares First{axis}={tiff_data.attrib[f'First{axis}']}, beyond "
                f"Size{axis}={sizes[axis]}"
            )


def _ome_int(element: ElementTree.Element, name: str, least: int, default: int | None = None) -> int:
    text = element.attrib.get(name)
    if text is None and default is not None:
        return default
    try:
        value = int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidImageError(f"the OME-XML's {name}={text!r} is not a whole number") from None
    if value < least:
        raise InvalidImageError(f"the OME-XML's {name}={value} is below {least}")
    return value


def _ome_modulo(along: ElementTree.Element) -> None:
    try:
        start, end = float(along.attrib["Start"]), float(along.attrib.get("End", "nan"))
        step = float(along.attrib.get("Step", 1))
        labels = (end - start + step) / step
    except (ValueError, ZeroDivisionError):
        labels = math.nan
    if not (math.isfinite(labels) and 0 <= labels <= MAX_MODULO_LABELS):
        raise InvalidImageError("the OME-XML's modulo annotation declares an invalid or huge Start..End range")


# 3. The series


def _select(tif: tifffile.TiffFile, structure: _Structure) -> _Series:
    """The series decoded: the one series, or several of one shape stacked along "I"."""
    series = tif.series
    if not series:
        raise InvalidImageError("the TIFF holds no image")
    first = series[0]
    if len(series) > 1 and len({(s.shape, s.axes, s.dtype) for s in series}) > 1:
        shapes = ", ".join(str(s.shape) for s in series[:4])
        raise InvalidImageError(f"the TIFF holds {len(series)} images of different shapes ({shapes})")
    shape, axes = tuple(int(n) for n in first.shape), str(first.axes)
    if len(series) > 1:
        shape, axes = (len(series), *shape), "I" + axes
    if len(axes) != len(shape) or len(set(axes)) != len(axes) or "Y" not in axes or "X" not in axes:
        raise InvalidImageError(f"the TIFF's axes {axes!r} (shape {shape}) do not name Y and X once each")
    if any(size < 1 for size in shape):
        raise InvalidImageError(f"the TIFF's image has an empty axis (shape {shape}, axes {axes!r})")
    _check_samples(first.keyframe)
    return _Series(list(series), shape, axes, np.dtype(first.dtype))


def _check_samples(keyframe: tifffile.TiffPage) -> None:
    dtype, stored = keyframe.dtype, keyframe._dtype  # what tifffile decodes to, and from (None: it cannot)
    if stored is None or dtype is None or dtype.kind not in _SUPPORTED_KINDS or dtype.itemsize > 8:
        raise UnsupportedImageError(
            f"the TIFF's samples ({keyframe.bitspersample}-bit, SampleFormat {keyframe.sampleformat}) are not a "
            "type we read: 1- to 64-bit integers or 16- to 64-bit floats"
        )


def _count(selected: _Series) -> TiffShape:
    """What decoding allocates: the series' own shape, or its pages at their keyframe's size where that is more."""
    axes, shape = selected.axes, selected.shape
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    samples = shape[axes.index("S")] if "S" in axes else 1
    values = math.prod(shape)
    paged = sum(len(s.pages) * math.prod(s.keyframe.shaped) for s in selected.series)
    planes = math.ceil(max(values, paged) / (height * width * samples))
    return TiffShape(height, width, planes * math.ceil(samples * selected.dtype.itemsize / SAMPLE_BYTES))


def _pages(selected: _Series) -> Iterator[list]:
    for series in selected.series:
        yield [page for page in series.pages if page is not None]


# 4. Every page decoded


def _check_pages(pages: list, data: bytes) -> None:
    if not pages:
        return
    keyframe = pages[0].keyframe
    _check_keyframe(keyframe)
    layout = _Layout.of(keyframe)
    for page in pages:
        if page.keyframe is not keyframe and (page.keyframe.shaped, page.keyframe.dtype) != (
            keyframe.shaped,
            keyframe.dtype,
        ):
            raise InvalidImageError("the TIFF's series holds pages of different shapes")
        if page.keyframe is not keyframe:
            _check_keyframe(page.keyframe)
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) != layout.segments or len(counts) != layout.segments:
            raise InvalidImageError(
                f"a page of the TIFF holds {len(offsets):,} strips or tiles where its size needs {layout.segments:,}"
            )
        for index, (offset, count) in enumerate(zip(offsets, counts, strict=True)):
            if count > 4 * layout.rows * layout.columns * layout.bytes_per_pixel + SEGMENT_SLACK:
                raise InvalidImageError(
                    f"a strip or tile of the TIFF holds {count:,} bytes, more than its {layout.columns}x{layout.rows} "
                    "pixels need"
                )
            if keyframe.compression == 7 and count:
                _check_jpeg(data, offset, count, layout, index)


def _check_keyframe(keyframe: tifffile.TiffPage) -> None:
    _check_samples(keyframe)
    compression = int(keyframe.compression)
    if compression not in COMPRESSIONS:
        name = getattr(tifffile.COMPRESSION, "_value2member_map_", {}).get(compression)
        named = f"{name.name} ({compression})" if name is not None else str(compression)
        raise UnsupportedImageError(f"the TIFF's compression {named} is not one we read: {PROMISED}")
    if keyframe.is_tiled:
        tile = keyframe.tiledepth * keyframe.tilelength * keyframe.tilewidth
        image = keyframe.imagedepth * _ceil16(keyframe.imagelength) * _ceil16(keyframe.imagewidth)
        if tile > max(image, 1024 * 1024):
            raise InvalidImageError(
                f"the TIFF's tiles ({keyframe.tilewidth}x{keyframe.tilelength}) are larger than its image "
                f"({keyframe.imagewidth}x{keyframe.imagelength})"
            )


def _ceil16(size: int) -> int:
    return -(-size // 16) * 16


@dataclass(frozen=True)
class _Layout:
    """Where each strip or tile of a page lies, as tifffile lays them out."""

    segments: int
    rows: int  # of a full strip or tile
    columns: int
    image_rows: int
    image_columns: int
    across: int  # tiles across a row of tiles (1 for strips)
    down: int  # strips or tile rows down one plane
    samples: int  # samples per segment pixel
    bytes_per_pixel: int

    @classmethod
    def of(cls, page: tifffile.TiffPage) -> _Layout:
        planar = page.planarconfig == 2
        samples = 1 if planar else page.samplesperpixel
        separate = page.samplesperpixel if planar else 1
        itemsize = page.dtype.itemsize if page.dtype is not None else 8
        if page.is_tiled:
            rows, columns, depth = page.tilelength, page.tilewidth, page.tiledepth
        else:
            rows, columns, depth = min(page.rowsperstrip, page.imagelength), page.imagewidth, 1
        if min(rows, columns, depth, page.imagelength, page.imagewidth, page.imagedepth, page.samplesperpixel) < 1:
            raise InvalidImageError("the TIFF's strips or tiles, or its image, have a size of 0")
        depth = -(-page.imagedepth // depth)
        down, across = -(-page.imagelength // rows), -(-page.imagewidth // columns)
        return cls(
            separate * depth * down * across,
            rows,
            columns,
            page.imagelength,
            page.imagewidth,
            across,
            down,
            samples,
            samples * itemsize,
        )

    def allowed(self, index: int) -> tuple[set[int], set[int]]:
        """The (rows, columns) a segment's own header may declare: the full strip or tile, or what is left of the
        image at its place (strips at the bottom, tiles at the right and bottom edges)."""
        row = (index // self.across) % self.down * self.rows
        column = index % self.across * self.columns
        return (
            {self.rows, min(self.rows, self.image_rows - row)},
            {self.columns, min(self.columns, self.image_columns - column)},
        )


def _check_jpeg(data: bytes, offset: int, count: int, layout: _Layout, index: int) -> None:
    """A JPEG strip or tile's own frame header must declare that strip's or tile's size and samples."""
    segment = memoryview(data)[offset : offset + count]
    frame = _jpeg_frame(segment)
    if frame is None:
        raise InvalidImageError("a JPEG strip or tile of the TIFF has no JPEG frame header")
    marker, rows, columns, components = frame
    if marker not in _JPEG_FRAMES:
        raise UnsupportedImageError(f"a JPEG strip or tile of the TIFF uses a JPEG process we do not read ({marker:X})")
    if bytes(segment).count(b"\xff\xda") > MAX_JPEG_SCANS:  # 0xFFDA cannot occur inside entropy-coded data
        raise InvalidImageError(f"a JPEG strip or tile of the TIFF holds over {MAX_JPEG_SCANS} scans")
    allowed_rows, allowed_columns = layout.allowed(index)
    if rows not in allowed_rows or columns not in allowed_columns or components != layout.samples:
        raise InvalidImageError(
            f"a JPEG strip or tile of the TIFF declares {columns}x{rows} pixels of {components} samples in its own "
            f"header, not the {layout.columns}x{layout.rows} of {layout.samples} the TIFF lays out there"
        )


def _jpeg_frame(segment: memoryview) -> tuple[int, int, int, int] | None:
    """(marker, height, width, components) of a JPEG stream's frame header (SOFn), None where it has none."""
    if bytes(segment[:2]) != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(segment):
        if segment[position] != 0xFF:
            return None
        marker = segment[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        length = int.from_bytes(segment[position + 2 : position + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if length < 8 or position + 10 > len(segment):
                return None
            rows = int.from_bytes(segment[position + 5 : position + 7], "big")
            columns = int.from_bytes(segment[position + 7 : position + 9], "big")
            return marker, rows, columns, segment[position + 9]
        position += 2 + length
    return None

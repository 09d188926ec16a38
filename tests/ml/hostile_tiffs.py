"""Hostile TIFFs written byte by byte (issue 26's decoding findings), and the fuzz corpus: valid TIFFs of many
kinds written by tifffile, then mutated. The tests of app.ml.tiffbudget and the end-to-end tests share them, and
scripts/reliability_check.py measures the server under the issue's own sizes."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import imagecodecs
import numpy as np
import tifffile

SHORT, LONG, ASCII, UNDEFINED = 3, 4, 2, 7
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


@dataclass
class Page:
    """One IFD: its tags (code -> (type, values)) and its strips or tiles (the same bytes written once)."""

    width: int
    height: int
    segments: list[bytes]
    tags: dict[int, tuple[int, object]] = field(default_factory=dict)
    compression: int = 1
    bits: int | list[int] = 8
    samples: int = 1
    rows_per_strip: int | None = None
    tile: tuple[int, int] | None = None
    description: str | None = None


def write(pages: list[Page]) -> bytes:
    """A classic little-endian TIFF of `pages`, in order, strips or tiles before the IFDs."""
    out = bytearray(b"II*\x00" + bytes(4))
    offsets: dict[bytes, int] = {}
    for page in pages:
        for segment in page.segments:
            if segment not in offsets:
                offsets[segment] = len(out)
                out += segment + bytes(len(segment) % 2)
    previous = 4  # where the offset of the next IFD goes
    for page in pages:
        tags = {
            256: (LONG, [page.width]),
            257: (LONG, [page.height]),
            258: (SHORT, page.bits if isinstance(page.bits, list) else [page.bits] * page.samples),
            259: (SHORT, [page.compression]),
            262: (SHORT, [1]),
            277: (SHORT, [page.samples]),
        }
        if page.description is not None:
            tags[270] = (ASCII, page.description)
        places = [offsets[s] for s in page.segments]
        counts = [len(s) for s in page.segments]
        if page.tile:
            tags |= {322: (LONG, [page.tile[1]]), 323: (LONG, [page.tile[0]])}
            tags |= {324: (LONG, places), 325: (LONG, counts)}
        else:
            tags |= {273: (LONG, places), 279: (LONG, counts), 278: (LONG, [page.rows_per_strip or page.height])}
        tags |= page.tags
        struct.pack_into("<I", out, previous, _ifd(out, tags))
        previous = len(out) - 4
    return bytes(out)


def _ifd(out: bytearray, tags: dict[int, tuple[int, object]]) -> int:
    """Append the IFD (its out-of-line values first); return its offset. Its next-IFD offset is the last 4 bytes."""
    entries = []
    for code in sorted(tags):
        kind, values = tags[code]
        if kind == ASCII:
            raw = str(values).encode() + b"\x00"
        elif kind == UNDEFINED:
            raw = bytes(values)  # type: ignore[arg-type]
        else:
            raw = struct.pack(f"<{len(values)}{'H' if kind == SHORT else 'I'}", *values)  # type: ignore[arg-type]
        count = len(raw) if kind in (ASCII, UNDEFINED) else len(values)  # type: ignore[arg-type]
        if len(raw) <= 4:
            field_ = raw.ljust(4, b"\x00")
        else:
            field_ = struct.pack("<I", len(out))
            out += raw + bytes(len(raw) % 2)
        entries.append(struct.pack("<HHI", code, kind, count) + field_)
    offset = len(out)
    out += struct.pack("<H", len(entries)) + b"".join(entries) + bytes(4)
    return offset


def deflate_zeros(size: int) -> bytes:
    return zlib.compress(bytes(size), 9)


def ome_xml(width: int, height: int, tiff_data: str, order: str = "XYZCT", z: int = 1, c: int = 1, t: int = 1) -> str:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="{OME_NS}"><Image ID="Image:0">'
        f'<Pixels ID="Pixels:0" DimensionOrder="{order}" Type="uint8" SizeX="{width}" SizeY="{height}" '
        f'SizeZ="{z}" SizeC="{c}" SizeT="{t}"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
        f"{tiff_data}</Pixels></Image></OME>"
    )


def small_page(description: str | None = None) -> Page:
    return Page(16, 16, [bytes(range(256))], description=description)


# Issue 26, point 1: a 16x16 first page whose OME-XML points the image at a large second page.
def ome_hidden_page(width: int = 8000, height: int = 6000) -> bytes:
    rows = 64
    strip = deflate_zeros(rows * width)  # every strip the same bytes, written once
    hidden = Page(width, height, [strip] * -(-height // rows), compression=8, rows_per_strip=rows)
    xml = ome_xml(width, height, '<TiffData IFD="1" PlaneCount="1"/>')
    return write([small_page(xml), hidden])


# Point 2: a 16x16 OME-TIFF whose TiffData declares 300,000,000 planes.
def ome_plane_count(planes: int = 300_000_000) -> bytes:
    return write([small_page(ome_xml(16, 16, f'<TiffData IFD="0" PlaneCount="{planes}"/>'))])


# Point 3: samples per pixel, stored planar: 2400x2400 with 450 samples.
def planar_samples(width: int = 2400, height: int = 2400, samples: int = 450) -> bytes:
    plane = deflate_zeros(width * height)
    extra = {338: (SHORT, [0] * (samples - 1)), 284: (SHORT, [2])}  # ExtraSamples unspecified, PlanarConfig separate
    return write([Page(width, height, [plane] * samples, extra, compression=8, samples=samples)])


# Point 4: an image codec's stream as the strip of a 16x16 page, decoded at its own size.
def png_strip(embedded: int = 50_000) -> bytes:
    return write([Page(16, 16, [png_of_zeros(embedded)], compression=34933)])


def png_of_zeros(side: int) -> bytes:
    """A side x side 8-bit gray PNG of zeros, compressed row block by row block (never held whole)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    block = bytes((side + 1) * 256)  # 256 rows, each filter byte 0 and its zeros
    parts = [compressor.compress(block) for _ in range(side // 256)]
    parts += [compressor.compress(bytes((side + 1) * (side % 256))), compressor.flush()]
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def jpeg2000_strip(embedded: int = 2048) -> bytes:
    stream = imagecodecs.jpeg2k_encode(np.zeros((embedded, embedded), np.uint8), level=0, codecformat="j2k")
    return write([Page(16, 16, [stream], compression=34712)])


def jpeg_with_header(rows: int, columns: int) -> bytes:
    """A 16x16 JPEG whose frame header is rewritten to declare rows x columns."""
    stream = bytearray(imagecodecs.jpeg8_encode(np.full((16, 16), 128, np.uint8), level=90))
    at = next(i for i in range(2, len(stream) - 9) if stream[i] == 0xFF and stream[i + 1] in (0xC0, 0xC1, 0xC2))
    struct.pack_into(">HH", stream, at + 5, rows, columns)
    return bytes(stream)


def jpeg_strip_lying(rows: int = 30_000, columns: int = 30_000) -> bytes:
    return write([Page(16, 16, [jpeg_with_header(rows, columns)], compression=7)])


# Point 8: values that reached the code unchecked.
def bits_per_sample(bits: int) -> bytes:
    return write([Page(16, 16, [bytes(256 * max(bits, 8) // 8)], bits=bits)])


def shaped_axes(axes: str = "YYX") -> bytes:
    buffer = io.BytesIO()
    description = f'{{"shape": [2, 16, 16], "axes": "{axes}"}}'
    tifffile.imwrite(buffer, np.zeros((2, 16, 16), np.uint8), description=description, metadata=None)
    return buffer.getvalue()


def ome_dimension_order(order: str = "XYZZT") -> bytes:
    xml = ome_xml(16, 16, '<TiffData IFD="0" PlaneCount="2"/>', order=order, z=2)
    return write([small_page(xml), small_page()])


def two_channels() -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((2, 32, 32), np.uint8), imagej=True, metadata={"axes": "CYX"})
    return buffer.getvalue()


# Points 5 and 9: an OME-TIFF of 32x32 channels named as given, every character kept (CR and LF as XML character
# references, as every character beyond printable ASCII, which the XML parser turns back into themselves).
def named_channels(*names: str) -> bytes:
    pixels = np.zeros((len(names), 32, 32), np.uint8)
    placeholders = [f"channel-{index}" for index in range(len(names))]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, ome=True, metadata={"axes": "CYX", "Channel": {"Name": placeholders}})
    with tifffile.TiffFile(io.BytesIO(buffer.getvalue())) as tif:
        xml = tif.ome_metadata
    for placeholder, name in zip(placeholders, names, strict=True):
        escaped = "".join(c if c.isascii() and c.isprintable() and c not in '"&<>' else f"&#{ord(c)};" for c in name)
        xml = xml.replace(f'Name="{placeholder}"', f'Name="{escaped}"')
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for index, plane in enumerate(pixels):  # one page per channel, the first with the edited OME-XML
            tif.write(plane, description=xml if index == 0 else None, metadata=None, contiguous=False)
    return buffer.getvalue()

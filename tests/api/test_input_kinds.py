"""Every kind of image file a microscope writes, written here with tifffile and posted to the real server.

Each case says what the service does with it; `docs/input-formats.md` holds the same table (a test below keeps the
two equal; `python -m tests.api.test_input_kinds` prints it).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from app.ml.data.synth import generate_image
from app.ml.imageio import to_uint8
from app.ml.scoring.metric import image_score
from tests.api.conftest import png
from tests.api.test_segment import decode_cells

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs" / "input-formats.md"
GRAY = to_uint8(generate_image(np.random.default_rng(3), 256, 256, "shsy5y").image)  # 256x256, as trained
BLANK = np.zeros_like(GRAY)
REDUCED_PRECISION_FRAMES = 0.95


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def pages(*frames: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for frame in frames:
            writer.write(frame, metadata=None)
    return buffer.getvalue()


@dataclass(frozen=True)
class Kind:
    """One input kind: how it is written, what it is posted with, and what the service must answer."""

    written: str
    make: Callable[[], bytes]
    does: str
    params: dict[str, str] = field(default_factory=dict)
    same_cells: float | None = 1.0  # agreement with the 8-bit PNG's cells (image_score); None: not compared
    frames: list[np.ndarray | None] | None = None  # a stack: per frame, the image it holds (None: blank)
    status: int = 200


NOISE = np.random.default_rng(4).integers(0, 65535, GRAY.shape).astype(np.uint16)
HYPERSTACK = np.stack([np.stack([GRAY.astype(np.uint16) * 257, NOISE])[None]] * 2)  # T=2, Z=1, C=2: TZCYX


def ome_two_channels() -> bytes:
    channels = np.stack([GRAY.astype(np.uint16) * 257, NOISE])
    return tiff(channels, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["Phase", "GFP"]}})


KINDS: dict[str, Kind] = {
    "8-bit PNG": Kind("Pillow", lambda: png(GRAY), "the reference: the cells every other kind is compared with"),
    "TIFF, uncompressed": Kind("`imwrite(a)`", lambda: tiff(GRAY), "the same cells"),
    **{f"TIFF, {name}": Kind(f"`compression={value!r}`", lambda v=value: tiff(GRAY, compression=v), "the same cells")
       for name, value in [("LZW", "lzw"), ("Deflate", "zlib"), ("PackBits", "packbits"), ("Zstandard", "zstd")]},
    "TIFF, LZMA": Kind("`compression='lzma'`", lambda: tiff(GRAY, compression="lzma"),
                       "415: the TIFF's compression LZMA (34925) is not one we read: uncompressed, LZW, Deflate, "
                       "Zstandard, PackBits or JPEG", same_cells=None, status=415),
    "TIFF, tiled, LZW": Kind("`tile=(64, 64), compression='lzw'`", lambda: tiff(GRAY, tile=(64, 64), compression="lzw"),
                             "the same cells"),
    "BigTIFF": Kind("`bigtiff=True`", lambda: tiff(GRAY, bigtiff=True), "the same cells"),
    "TIFF, JPEG-compressed": Kind("`compression='jpeg'`", lambda: tiff(GRAY, compression="jpeg"),
                                  "nearly the same cells (JPEG is lossy)", same_cells=0.8),
    "16-bit TIFF": Kind("`a * 257` as uint16", lambda: tiff(GRAY.astype(np.uint16) * 257), "the same cells"),
    "12-bit camera values in a 16-bit TIFF": Kind(
        "`a * 16` as uint16 (0..4080)", lambda: tiff(GRAY.astype(np.uint16) * 16),
        "the same cells: the network sees each image standardized, whatever its range", same_cells=0.95),
    "32-bit float TIFF in [0, 1]": Kind("`a / 255` as float32", lambda: tiff((GRAY / 255).astype(np.float32)),
                                        "the same cells: floats in [0, 1] are taken as they are"),
    "32-bit float TIFF, any range": Kind("`a / 255 * 1000 - 20` as float32",
                                         lambda: tiff((GRAY / 255 * 1000 - 20).astype(np.float32)),
                                         "the same cells: other floats are scaled from their own minimum and maximum",
                                         same_cells=0.95),
    "RGB TIFF": Kind("`np.stack([a, a, a], -1)`", lambda: tiff(np.stack([GRAY] * 3, -1)),
                     "the same cells: RGB becomes its luminance"),
    "RGB TIFF, one channel chosen": Kind("`np.stack([b, a, b], -1)`, posted with `channel=green`",
                                         lambda: tiff(np.stack([BLANK, GRAY, BLANK], -1)),
                                         "the same cells, from the green channel", params={"channel": "green"}),
    "OME-TIFF, 2 named channels, none chosen": Kind(
        "`ome=True`, axes `CYX`, channels Phase and GFP", ome_two_channels,
        "422: the image has 2 channels: 0 (Phase), 1 (GFP); choose one with channel=<index or name>",
        same_cells=None, status=422),
    "OME-TIFF, channel by name": Kind("the same file, posted with `channel=Phase`", ome_two_channels,
                                      "the same cells, from the Phase channel", params={"channel": "Phase"}),
    "ImageJ hyperstack, 2 time points x 2 channels": Kind(
        "`imagej=True`, axes `TZCYX`, posted with `channel=0`",
        lambda: tiff(HYPERSTACK, imagej=True, metadata={"axes": "TZCYX"}),
        "one result per time point (axes `TZ`), each the same cells", params={"channel": "0"},
        frames=[GRAY, GRAY]),
    "Z-stack": Kind("`imagej=True`, axes `ZYX`, 3 planes (image, blank, image)",
                    lambda: tiff(np.stack([GRAY, BLANK, GRAY]), imagej=True, metadata={"axes": "ZYX"}),
                    "one result per plane; the blank plane has no cells", frames=[GRAY, None, GRAY]),
    "Pages written one by one": Kind("`TiffWriter.write` per page, no metadata", lambda: pages(GRAY, GRAY),
                                     "one result per page (axes `I`)", frames=[GRAY, GRAY]),
    "Z-stack as a label TIFF": Kind(
        "the Z-stack, posted with `format=tiff`",
        lambda: tiff(np.stack([GRAY, BLANK, GRAY]), imagej=True, metadata={"axes": "ZYX"}),
        "a 16-bit ImageJ label TIFF with one page per plane, axes ZYX", params={"format": "tiff"},
        same_cells=None),
    "Z-stack as a PNG": Kind(
        "the Z-stack, posted with `format=png`",
        lambda: tiff(np.stack([GRAY, BLANK, GRAY]), imagej=True, metadata={"axes": "ZYX"}),
        "422: the image is a stack of 3 frames (axes Z); format=png answers one image: ask for format=json or "
        "format=tiff", params={"format": "png"}, same_cells=None, status=422),
}  # fmt: skip


def markdown_table() -> str:
    rows = [f"| {name} | {kind.written} | {kind.does} |" for name, kind in KINDS.items()]
    return "\n".join(["| input | written with tifffile as | what the service does |", "| --- | --- | --- |", *rows])


@pytest.fixture(scope="module")
def frame_bar(server: str) -> float:
    """The score a stack's frame must reach against the lone PNG's cells. In float32, 1.0: the same cells. In reduced
    precision (bfloat16 on a CPU that computes it natively), the frames run together in one micro-batch (this server
    takes up to 8), whose arithmetic rounds differently from the PNG's batch of one, so a few pixels move."""
    precision = httpx.get(f"{server}/ready", timeout=60).json()["precision"]
    return 1.0 if precision == "float32" else REDUCED_PRECISION_FRAMES


@pytest.fixture(scope="module")
def reference(server: str) -> np.ndarray:
    body = httpx.post(f"{server}/segment", files={"file": ("a.png", png(GRAY))}, timeout=60).json()
    assert body["cell_count"] > 3, "the reference image must have cells to compare"
    return decode_cells(body)


def post(client: httpx.Client, kind: Kind) -> httpx.Response:
    return client.post("/segment", params=kind.params, files={"file": ("image.tif", kind.make(), "image/tiff")})


@pytest.mark.parametrize("name", list(KINDS))
def test_each_input_kind_gets_what_the_table_says(client, reference, frame_bar, name):
    kind = KINDS[name]
    response = post(client, kind)
    assert response.status_code == kind.status, response.text
    if kind.status != 200:
        assert kind.does.removeprefix(f"{kind.status}: ") in response.json()["detail"]
    elif kind.params.get("format") == "tiff":
        with tifffile.TiffFile(io.BytesIO(response.content)) as labels:
            assert labels.series[0].axes == "ZYX" and labels.pages.first.dtype == np.uint16
            planes = labels.asarray()
        assert image_score(planes[0], reference) >= frame_bar and planes[1].max() == 0
        assert response.headers["x-frame-count"] == "3"
    elif kind.frames is not None:
        body = response.json()
        assert body["frame_count"] == len(kind.frames) == len(body["frames"])
        for frame, image in zip(body["frames"], kind.frames, strict=True):
            found = decode_cells({**frame, "height": body["height"], "width": body["width"]})
            assert image_score(found, reference) >= frame_bar if image is not None else frame["cell_count"] == 0
    elif kind.same_cells is not None:
        assert image_score(decode_cells(response.json()), reference) >= kind.same_cells


def test_the_docs_table_is_this_test_s_table():
    assert markdown_table() in DOCS.read_text(), f"update {DOCS.name}: python -m tests.api.test_input_kinds"


if __name__ == "__main__":
    print(markdown_table())

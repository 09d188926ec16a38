"""Every kind of bad input gets a clear 4xx with a JSON detail, and the next good request still succeeds."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile

from tests.api.conftest import png

pytestmark = pytest.mark.slow

GOOD = png(np.random.default_rng(0).integers(0, 256, (96, 128)).astype(np.uint8))
ACCEPTED = "Accepted: one PNG, JPEG or TIFF image"


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


Z_STACK = tiff(np.zeros((4, 64, 64), np.uint16), imagej=True, metadata={"axes": "ZYX"})
TWO_CHANNELS = tiff(
    np.zeros((2, 64, 64), np.uint16), ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["Phase", "GFP"]}}
)


# name: (multipart files, query parameters, status, part of the detail)
CASES = {
    "no file": ({}, {}, 400, "no file uploaded: send the image as multipart/form-data field 'file'"),
    "both fields": ({"file": ("a.png", GOOD), "files": ("b.png", GOOD)}, {}, 400, "not both"),
    "empty file": ({"file": ("empty.png", b"")}, {}, 422, "the file 'empty.png' is empty"),
    "not an image": ({"file": ("notes.txt", b"these are my notes")}, {}, 415, "not an image we can read"),
    "truncated png": ({"file": ("cut.png", GOOD[: len(GOOD) // 2])}, {}, 422, "truncated or corrupt"),
    "100000x100000 header": ({"file": ("bomb.png", png_declaring(100_000, 100_000))}, {}, 413,
                             "declares 100000x100000 = 10,000,000,000 pixels"),
    "1x1 image": ({"file": ("dot.png", png(np.zeros((1, 1), np.uint8)))}, {}, 422, "1x1, too small"),
    "stack as a png": ({"file": ("stack.tif", Z_STACK)}, {"format": "png"}, 422,
                       "a stack of 4 frames (axes Z); format=png answers one image: ask for format=json or "
                       "format=tiff"),
    "two channels, none chosen": ({"file": ("two.tif", TWO_CHANNELS)}, {}, 422,
                                  "2 channels: 0 (Phase), 1 (GFP); choose one with channel=<index or name>"),
    "unknown channel": ({"file": ("two.tif", TWO_CHANNELS)}, {"channel": "DAPI"}, 422,
                        "channel='DAPI' is not in this image: it has 2 channels, 0..1 (Phase, GFP)"),
    "unknown format": ({"file": ("a.png", GOOD)}, {"format": "gif"}, 422,
                       "query parameter 'format': Input should be 'json', 'png', 'mask', 'overlay', 'tiff', 'roi', "
                       "'geojson' or 'coco' (got 'gif')"),
    "unknown mode": ({"file": ("a.png", GOOD)}, {"mode": "zoom"}, 422,
                     "query parameter 'mode': Input should be 'auto', 'resize' or 'tile' (got 'zoom')"),
    "threshold out of range": ({"file": ("a.png", GOOD)}, {"seed_threshold": "1.5"}, 422,
                               "query parameter 'seed_threshold': Input should be less than or equal to 0.99"),
}  # fmt: skip
IMAGE_PROBLEMS = {"not an image", "truncated png", "100000x100000 header", "1x1 image"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_4xx_with_a_clear_detail_and_the_service_keeps_serving(client, case):
    files, params, status, detail = CASES[case]
    # With no file at all, still send a form body: the request is well formed, only the image is missing.
    response = client.post("/segment", files=files or None, params=params, data=None if files else {"note": "x"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert detail in response.json()["detail"]
    if case in IMAGE_PROBLEMS:
        assert ACCEPTED in response.json()["detail"]
    assert client.post("/segment", files={"file": ("good.png", GOOD)}).status_code == 200


def test_several_files_with_a_png_format_is_refused(client):
    files = [("files", ("a.png", GOOD)), ("files", ("b.png", GOOD))]
    response = client.post("/segment", params={"format": "png"}, files=files)
    assert response.status_code == 400
    assert response.json()["detail"] == "format=png answers one image; use format=json for several"


def test_an_upload_over_the_size_limit_is_refused_without_reading_it(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(9 * 1024 * 1024)  # the test server accepts 8 MiB
    response = client.post("/segment", files={"file": ("huge.png", big)})
    assert response.status_code == 413
    assert response.json()["detail"].startswith("the upload is larger than the limit of 8,388,608 bytes")
    assert client.post("/segment", files={"file": ("good.png", GOOD)}).status_code == 200


def test_a_chunked_upload_over_the_limit_is_cut_off_with_413(client):
    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(12):
            yield bytes(1024 * 1024)

    response = client.post("/segment", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    assert client.post("/segment", files={"file": ("good.png", GOOD)}).status_code == 200

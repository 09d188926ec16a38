"""Issue 26's hostile TIFFs at the issue's own sizes against the real service (bundled model, default settings),
with the server's peak memory after each, then the most the pixel budget admits (four 2400x2400 PNGs, 23 MPx),
then fuzzed TIFFs. docs/reliability.md quotes its figures.

Run from the project root: python scripts/hostile_tiffs_check.py (about 3 minutes; --fuzz N sets the fuzzed files).
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' hostile files, run from anywhere

from app.bench.localserver import LocalServer, running_server
from tests.ml import hostile_tiffs as hostile
from tests.ml import tiff_fuzz

REAL = Path(__file__).resolve().parents[2] / "shared/data/sartorius/test/7ae19de7bc2a.png"

CASES = {
    "1. 16x16 first page, OME-XML's image the 8000x6000 second page": lambda: hostile.ome_hidden_page(8000, 6000),
    "2. OME-TIFF declaring PlaneCount=300000000": hostile.ome_plane_count,
    "3. 2400x2400 with 450 planar samples": lambda: hostile.planar_samples(2400, 2400, 450),
    "4. 16x16 page whose strip is a 50000x50000 PNG": lambda: hostile.png_strip(50_000),
    "4. 16x16 page whose strip is JPEG 2000": hostile.jpeg2000_strip,
    "4. 16x16 page whose JPEG strip's header declares 30000x30000": lambda: hostile.jpeg_strip_lying(30_000, 30_000),
    "8. BitsPerSample 0": lambda: hostile.bits_per_sample(0),
    "8. BitsPerSample 128": lambda: hostile.bits_per_sample(128),
    "8. tifffile shaped axes YYX": hostile.shaped_axes,
    "8. OME DimensionOrder XYZZT": lambda: hostile.ome_dimension_order("XYZZT"),
    "8. OME DimensionOrder XYXYT": lambda: hostile.ome_dimension_order("XYXYT"),
}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def peak_mib(server: LocalServer) -> int:
    return server.memory_kib()["VmHWM"] // 1024


def post(http: httpx.Client, server: LocalServer, files: object, **params: str) -> str:
    started = time.perf_counter()
    answer = http.post("/segment", files=files, params=params)
    took = round((time.perf_counter() - started) * 1000)
    health = time.perf_counter()
    http.get("/health")
    health_ms = round((time.perf_counter() - health) * 1000)
    return f"{answer.status_code} in {took} ms; /health after it {health_ms} ms; peak {peak_mib(server)} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz", type=int, default=300, help="fuzzed TIFFs to send (seed 260)")
    args = parser.parse_args()
    with (
        running_server(log_level="WARNING", timeout=300) as server,
        httpx.Client(base_url=server.url, timeout=300) as http,
    ):
        print(f"peak after start-up: {peak_mib(server)} MiB")
        print(f"one real 520x704 PNG: {post(http, server, {'file': ('a.png', REAL.read_bytes())})}")
        for name, make in CASES.items():
            data = make()
            print(f"{name} ({len(data):,} bytes): {post(http, server, {'file': ('h.tif', data)})}")
        two = {"file": ("c.tif", hostile.two_channels())}
        print(f"channel=² on a 2-channel TIFF: {post(http, server, two, channel='²')}")
        statuses: collections.Counter[int] = collections.Counter()
        started = time.perf_counter()
        for index, data in enumerate(tiff_fuzz.corpus(args.fuzz, seed=260)):
            statuses[http.post("/segment", files={"file": (f"{index}.tif", data)}).status_code] += 1
        seconds = time.perf_counter() - started
        print(f"{args.fuzz} fuzzed TIFFs in {seconds:.0f} s: {dict(statuses)}; peak {peak_mib(server)} MiB")
        # What the pixel budget admits at most, for comparison: its own figure. Resize mode: in auto mode these
        # are tiled, and their network inputs are over the request's budget (413).
        big = hostile.write(
            [hostile.Page(4800, 5000, [hostile.deflate_zeros(4800 * 50)] * 100, compression=8, rows_per_strip=50)]
        )
        answer = post(http, server, {"file": ("b.tif", big)}, mode="resize")
        print(f"a 4800x5000 Deflate TIFF (24 MPx), resize mode: {answer}")
        four = png(np.zeros((2400, 2400), np.uint8))
        files = [("files", (f"{i}.png", four)) for i in range(4)]
        print(f"four 2400x2400 blank PNGs (23 MPx), resize mode: {post(http, server, files, mode='resize')}")


if __name__ == "__main__":
    main()

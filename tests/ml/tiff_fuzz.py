"""Fuzzing the TIFF reader: valid TIFFs of many kinds written by tifffile (shapes, sample types, compressions, tiles,
strips, pages, planar samples, OME-XML, ImageJ and tifffile metadata, BigTIFF), then mutated (bytes of the IFDs and
their values overwritten, numbers in the metadata text replaced), each decoded through the service's decoder.

Every answer must be a decoded stack or one of our documented errors (InvalidImageError and its subclasses, which
the service answers as a JSON 413, 415 or 422), within the decoder's memory budget (`budget_bytes`).

`tests/ml/test_tiff_fuzz.py` runs it for a bounded time with a fixed seed; a longer run:
python -m tests.ml.tiff_fuzz --seconds 600 --seed 26
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import re
import resource
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from app.ml.errors import InvalidImageError
from app.ml.imageio import ImageLimits, decode_stack
from app.ml.tiffbudget import SAMPLE_BYTES

LIMITS = ImageLimits(max_pixels=1_000_000)
# What decoding may hold per pixel admitted: the decoded samples (SAMPLE_BYTES per counted pixel), a copy where
# the axes must be reordered, the float32 frames, and one frame's float temporaries; plus tifffile's read buffer.
BYTES_PER_PIXEL = 2 * SAMPLE_BYTES + 4 + 4
SLACK = 24 * 1024 * 1024

DTYPES = [np.uint8, np.uint8, np.uint16, np.int16, np.uint32, np.float32, np.float64, np.int8, np.bool_]
COMPRESSIONS = [None, None, "lzw", "zlib", "zstd", "packbits", "jpeg", "lzma", "png", "jpeg2000", "webp"]
INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 255, 256, 4096, 65535, 65536, 2**31 - 1, 2**32 - 1]


def budget_bytes(data: bytes, limits: ImageLimits = LIMITS) -> int:
    return limits.max_pixels * BYTES_PER_PIXEL + len(data) + SLACK


def valid_tiff(rng: np.random.Generator) -> bytes:
    """One valid TIFF of a random kind (tifffile refuses some combinations: then another is drawn)."""
    while True:
        try:
            return _valid_tiff(rng)
        except (ValueError, TypeError, NotImplementedError, KeyError, RuntimeError):
            continue


def _valid_tiff(rng: np.random.Generator) -> bytes:
    dtype = np.dtype(DTYPES[rng.integers(len(DTYPES))])
    large = rng.random() < 0.05  # now and then one plane near the limit of 1 MPx, or over it
    height, width = (int(n) for n in rng.integers(8, 1100 if large else 200, 2))
    samples = 1 if large else int(rng.choice([1, 1, 1, 3, 4, int(rng.integers(2, 12))]))
    frames = 1 if large else int(rng.choice([1, 1, 2, 3, 5]))
    options, shape = _options(rng, height, width, samples)
    if large and options["compression"] not in (None, "zlib", "zstd", "jpeg"):  # the others write slowly
        options["compression"] = "zstd"
    pixels = _pixels(rng, (frames, *shape) if frames > 1 else shape, dtype)
    buffer = io.BytesIO()
    kind = str(rng.choice(["plain", "pages", "shaped", "imagej", "ome"]))
    if kind == "pages" and frames > 1:
        with tifffile.TiffWriter(buffer, bigtiff=bool(options.pop("bigtiff"))) as writer:
            for frame in pixels:
                writer.write(frame, metadata=None, **options)
    elif kind == "imagej" and samples == 1:
        options.pop("bigtiff")
        tifffile.imwrite(buffer, pixels, imagej=True, metadata={"axes": "TYX" if frames > 1 else "YX"}, **options)
    elif kind == "ome":
        tifffile.imwrite(buffer, pixels, ome=True, **options)
    else:
        tifffile.imwrite(buffer, pixels, **options)
    return buffer.getvalue()


def _options(
    rng: np.random.Generator, height: int, width: int, samples: int
) -> tuple[dict[str, object], tuple[int, ...]]:
    """tifffile's writing options (compression, tiles or strips, predictor, samples' layout) and the page's shape."""
    compression = COMPRESSIONS[rng.integers(len(COMPRESSIONS))]
    options: dict[str, object] = {"compression": compression, "bigtiff": bool(rng.random() < 0.2)}
    if rng.random() < 0.4:
        options["tile"] = (16 * int(rng.integers(1, 5)), 16 * int(rng.integers(1, 5)))
    elif rng.random() < 0.5:
        options["rowsperstrip"] = int(rng.integers(1, height + 1))
    if compression in ("lzw", "zlib") and rng.random() < 0.5:
        options["predictor"] = True
    if samples == 1:
        return options | {"photometric": "minisblack"}, (height, width)
    planar = rng.random() < 0.3
    rgb = samples in (3, 4) and rng.random() < 0.7
    options |= {"planarconfig": "separate" if planar else "contig", "photometric": "rgb" if rgb else "minisblack"}
    if not rgb or samples > 3:
        options["extrasamples"] = [0] * (samples - (3 if rgb else 1))
    return options, (samples, height, width) if planar else (height, width, samples)


def _pixels(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return (rng.random(shape) * float(rng.choice([1.0, 1000.0]))).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """`data` with a few of its IFD entries, tag values, IFD links, header bytes or metadata numbers overwritten,
    or cut short."""
    entries, links, ifds = _targets(data)
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        choice = rng.random()
        if choice < 0.4 and entries:  # an IFD entry's type, count or value
            where = int(entries[rng.integers(len(entries))]) + int(rng.choice([2, 4, 8, 12]))
            _put(out, where, int(rng.choice(INTERESTING)), int(rng.choice([1, 2, 4])))
        elif choice < 0.5 and links:  # an IFD's next-IFD offset: to another IFD (or itself), or anywhere
            target = int(rng.choice(ifds)) if rng.random() < 0.7 else int(rng.integers(len(out)))
            _put(out, int(links[rng.integers(len(links))]), target, 8 if data[2:4] in (b"+\x00", b"\x00+") else 4)
        elif choice < 0.65:  # a number in the metadata text, same length so the offsets hold
            _renumber(out, rng)
        elif choice < 0.8:  # anywhere in the first bytes (header, first IFD of most writers)
            out[int(rng.integers(0, min(len(out), 512)))] = int(rng.integers(256))
        elif choice < 0.95:  # anywhere
            out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
        else:  # cut short
            del out[int(rng.integers(8, len(out))) :]
    return bytes(out)


def _targets(data: bytes) -> tuple[list[int], list[int], list[int]]:
    """Byte positions of the IFD entries and of their out-of-line values; of the IFDs' next-IFD offsets; of the
    IFDs."""
    entries: list[int] = []
    links: list[int] = []
    ifds: list[int] = []
    try:
        with tifffile.TiffFile(io.BytesIO(data), _multifile=False) as tif:
            tagno, tagsize = tif.tiff.tagnosize, tif.tiff.tagsize
            for page in tif.pages[:8]:
                ifds.append(page.offset)
                links.append(page.offset + tagno + len(page.tags) * tagsize)
                for tag in page.tags:
                    entries += [tag.offset, tag.valueoffset]
    except Exception:  # a file tifffile cannot index just gets random mutations
        pass
    return entries, links, ifds


def _put(out: bytearray, where: int, value: int, size: int) -> None:
    if where + size > len(out):
        return
    order = "little" if out[:2] == b"II" else "big"
    out[where : where + size] = (value % (1 << (8 * size))).to_bytes(size, order)


_NUMBER = re.compile(rb"\d+")


def _renumber(out: bytearray, rng: np.random.Generator) -> None:
    matches = list(_NUMBER.finditer(bytes(out[:65536])))
    text = [m for m in matches if out[max(0, m.start() - 1)] in b'"= ,[:']
    if not text:
        return
    match = text[rng.integers(len(text))]
    length = match.end() - match.start()
    value = str(int(rng.choice([0, 1, 2, 9, 10**length - 1, int(rng.integers(0, 10**length))])))[:length]
    out[match.start() : match.end()] = value.rjust(length, "0").encode()


@dataclass
class Report:
    seed: int
    seconds: float = 0.0
    files: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)
    most_traced: int = 0  # bytes: the most one decode held (tracemalloc)
    most_traced_per_budget: float = 0.0

    def summary(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "files": self.files,
            "outcomes": dict(self.outcomes.most_common()),
            "failures": self.failures[:20],
            "over_budget": self.over_budget[:20],
            "most_traced_mib": round(self.most_traced / 2**20, 1),
            "most_traced_of_budget": round(self.most_traced_per_budget, 3),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def run(seconds: float, seed: int, keep: Path | None = None) -> Report:
    """Generate, mutate and decode for `seconds`; files that fail are written to `keep` when given."""
    rng = np.random.default_rng(seed)
    report = Report(seed)
    started = time.monotonic()
    tracemalloc.start()
    try:
        while time.monotonic() - started < seconds:
            data = valid_tiff(rng)
            if rng.random() < 0.85:
                data = mutate(data, rng)
            channel = rng.choice([None, None, "0", "1", "green", "²"])
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            try:
                stack = decode_stack(data, LIMITS, None if channel is None else str(channel))
                outcome = f"decoded {stack.frames.shape[0]} frame(s)"
            except InvalidImageError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # what must never happen: an error the service would answer 500
                outcome = f"FAILED {type(exc).__name__}"
                report.failures.append(f"file {report.files}: {type(exc).__name__}: {exc}"[:300])
                if keep:
                    (keep / f"failure-{seed}-{report.files}.tif").write_bytes(data)
            held = tracemalloc.get_traced_memory()[1] - before
            report.most_traced = max(report.most_traced, held)
            report.most_traced_per_budget = max(report.most_traced_per_budget, held / budget_bytes(data))
            if held > budget_bytes(data):
                report.over_budget.append(f"file {report.files}: {held:,} bytes ({outcome})")
                if keep:
                    (keep / f"over-budget-{seed}-{report.files}.tif").write_bytes(data)
            report.outcomes[outcome.split(" frame")[0] if outcome.startswith("decoded") else outcome] += 1
            report.files += 1
    finally:
        tracemalloc.stop()
        report.seconds = time.monotonic() - started
    return report


def corpus(count: int, seed: int) -> list[bytes]:
    """`count` fuzzed files (mostly mutated), for sending to a real server."""
    rng = np.random.default_rng(seed)
    return [mutate(valid_tiff(rng), rng) if rng.random() < 0.85 else valid_tiff(rng) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--keep", type=Path, help="folder to write failing files to")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.seconds, args.seed, args.keep).summary(), indent=2))


if __name__ == "__main__":
    main()

"""`predict`: segment a folder of images into a Kaggle submission CSV (`id,predicted`, one RLE row per cell) and,
with --formats, the files lab tools open, per image, into an output folder.

Masks never overlap (each pixel belongs to at most one cell); an image without cells gets one row with an empty
prediction, so every image id appears, as the competition expects. A file that cannot be read is named, skipped
and counted; the exit code is 1 when any was skipped.

Examples:
  predict --images /data/sartorius/test --out submission.csv
  predict --images plate7/ --out plate7.csv --formats tiff roi geojson --out-dir plate7-cells/
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from tqdm import tqdm

from app.cli import add_model_arguments, predictor_from_args, setup_logging
from app.ml import rle
from app.ml.checkpoint import atomic_write_bytes
from app.ml.errors import CellSegError
from app.ml.imageio import read_image
from app.ml.options import Mode
from app.ml.outputs import OutputFormat, encode
from app.ml.serving.predictor import Predictor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, help="folder of images; the file name without suffix is the id")
    parser.add_argument("--out", default="submission.csv", help="CSV to write (default: submission.csv)")
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=Mode.AUTO.value,
        help="'auto' (resize near the trained image size, else tile; the default), 'resize' (572x572 and back) or "
        "'tile' (overlap-tile at the trained pixel scale)",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=[],
        choices=[f.value for f in OutputFormat],
        help="also write these files per image into --out-dir: " + ", ".join(OutputFormat),
    )
    parser.add_argument("--out-dir", default="predictions", help="folder for --formats (default: predictions)")
    return parser


def segment_folder(
    predictor: Predictor, paths: list[Path], mode: str, formats: list[OutputFormat], out_dir: Path
) -> tuple[list[tuple[str, str]], list[str]]:
    """Kaggle CSV rows of every readable image, with its files in `formats` written into out_dir; and the
    problems of the images that could not be read, one line each."""
    rows: list[tuple[str, str]] = []
    skipped: list[str] = []
    for path in tqdm(paths, desc="predict", unit="img"):
        try:
            image = read_image(path)
        except CellSegError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        instances = predictor.predict(image, mode)
        encoded = rle.encode_labels(instances.labels)
        rows += [(path.stem, encoded[label]) for label in sorted(encoded)] or [(path.stem, "")]
        for output in formats:
            data = encode(output, image, instances)
            data = data if isinstance(data, bytes) else json.dumps(data).encode()
            atomic_write_bytes(out_dir / f"{path.stem}{output.file_suffix}", data)
    return rows, skipped


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"predict: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.images}")
    try:
        predictor = predictor_from_args(args)
        formats = [OutputFormat(name) for name in args.formats]
        rows, skipped = segment_folder(predictor, paths, args.mode, formats, Path(args.out_dir))
    except CellSegError as exc:
        print(f"predict: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "predicted"])
    writer.writerows(rows)
    atomic_write_bytes(Path(args.out), buffer.getvalue().encode())
    print(f"wrote {len(rows)} rows for {len(paths) - len(skipped)} images to {args.out}")
    if skipped:
        print(f"predict: skipped {len(skipped)} of {len(paths)} files:", *skipped, sep="\n  ", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

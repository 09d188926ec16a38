"""`predict`: segment a folder of images into a Kaggle submission CSV (`id,predicted`, one RLE row per cell).

Masks never overlap (each pixel belongs to at most one cell); an image without cells gets one row with an empty
prediction, so every image id appears, as the competition expects.

Example:
  predict --model model_store/default-v1 --images /data/sartorius/test --out submission.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from tqdm import tqdm

from app.cli import add_model_arguments, predictor_from_args, setup_logging
from app.ml import rle
from app.ml.checkpoint import atomic_write_bytes
from app.ml.errors import CellSegError
from app.ml.imageio import read_image
from app.ml.options import Mode
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
    return parser


def submission_rows(predictor: Predictor, paths: list[Path], mode: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for path in tqdm(paths, desc="predict", unit="img"):
        instances = predictor.predict(read_image(path), mode)
        encoded = rle.encode_labels(instances.labels)
        rows += [(path.stem, encoded[label]) for label in sorted(encoded)] or [(path.stem, "")]
    return rows


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"predict: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.images}")
    try:
        predictor = predictor_from_args(args)
        rows = submission_rows(predictor, paths, args.mode)
    except CellSegError as exc:
        print(f"predict: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "predicted"])
    writer.writerows(rows)
    atomic_write_bytes(Path(args.out), buffer.getvalue().encode())
    print(f"wrote {len(rows)} rows for {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()

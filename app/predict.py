"""`predict`: segment a folder of images into a Kaggle submission CSV (`id,predicted`, one RLE row per cell) and,
with --formats, the files lab tools open, per image, into an output folder.

Masks never overlap (each pixel belongs to at most one cell); an image without cells gets one row with an empty
prediction, so every image id appears, as the competition expects. A file that cannot be read is named, skipped
and counted; the exit code is 1 when any was skipped.

Examples:
  predict --images /data/sartorius/test --out submission.csv
  predict --images plate7/ --out plate7.csv --formats tiff roi geojson --out-dir plate7-cells/

On a Ray cluster (`pip install '.[cluster]'`; docs/scale.md), the same files, with folders or fsspec URLs; a run
started again does only the images it has no files for, and the images that fail are listed in
<out-dir>/failures.jsonl:
  predict --images s3://lab/plate7/ --out-dir s3://lab/plate7-cells/ --out plate7.csv --formats tiff --cluster auto
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from tqdm import tqdm

from app.cli import add_model_arguments, inference_options, model_folder, predictor_from_args, setup_logging
from app.ml.checkpoint import atomic_write_bytes
from app.ml.errors import CellSegError
from app.ml.imageio import IMAGE_SUFFIXES, read_image
from app.ml.options import Mode
from app.ml.outputs import KaggleRow, OutputFormat, image_files, kaggle_rows, submission_csv
from app.ml.serving.predictor import Predictor


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
    parser.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run on a Ray cluster: auto (the one `ray start` joined this machine to), ray://HOST:10001, HOST:6379, "
        "or local (a new one on this machine); --images and --out-dir may then be fsspec URLs (s3://, gs://), "
        "and --out-dir also gets each image's Kaggle rows (<id>-kaggle.csv) and failures.jsonl",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="with --cluster: images per batch of a network actor (default: 8)"
    )
    parser.add_argument(
        "--merge-images",
        action="store_true",
        help="with --cluster: network passes across the images of a batch, 8 inputs at a time (feeds a GPU better; "
        "the cells may differ from predict's in the last bits); by default each image's inputs go through alone, as "
        "without --cluster, and the cells are the same",
    )
    return parser


def segment_folder(
    predictor: Predictor, paths: list[Path], mode: str, formats: list[OutputFormat], out_dir: Path
) -> tuple[list[KaggleRow], list[str]]:
    """Kaggle CSV rows of every readable image, with its files in `formats` written into out_dir; and the
    problems of the images that could not be read, one line each."""
    rows: list[KaggleRow] = []
    skipped: list[str] = []
    for path in tqdm(paths, desc="predict", unit="img"):
        try:
            image = read_image(path)
        except CellSegError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        instances = predictor.predict(image, mode)
        rows += kaggle_rows(path.stem, instances)
        for name, data in image_files(path.stem, image, instances, formats).items():
            atomic_write_bytes(out_dir / name, data)
    return rows, skipped


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.cluster:
        main_on_cluster(args)
        return
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
    atomic_write_bytes(Path(args.out), submission_csv(rows))
    print(f"wrote {len(rows)} rows for {len(paths) - len(skipped)} images to {args.out}")
    if skipped:
        print(f"predict: skipped {len(skipped)} of {len(paths)} files:", *skipped, sep="\n  ", file=sys.stderr)
        raise SystemExit(1)


def main_on_cluster(args: argparse.Namespace) -> None:
    """predict on the Ray cluster at args.cluster (app.cluster); Ray is imported only here, an optional extra."""
    if importlib.util.find_spec("ray") is None:
        raise SystemExit("predict: --cluster needs Ray, an optional extra: pip install '.[cluster]'")
    from app.cluster.run import ClusterJob, run  # noqa: PLC0415 - Ray is loaded only for a cluster run

    formats = tuple(OutputFormat(name) for name in args.formats)
    job = ClusterJob(
        args.images,
        args.out_dir,
        args.out,
        model_folder(args),
        inference_options(args),
        Mode(args.mode),
        formats,
        args.batch_size,
        args.merge_images,
    )
    try:
        report = run(args.cluster, job)
    except CellSegError as exc:
        print(f"predict: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(
        f"{len(report.done)} images done in {report.seconds:.1f} s ({report.rate:.2f} images/s), "
        f"{report.already_done} done before, {len(report.failures)} failed; wrote {args.out}"
    )
    if report.failures:
        reasons = [f"{image_id}: {reason}" for image_id, reason in sorted(report.failures.items())]
        print(
            f"predict: {len(reasons)} images failed (also in {args.out_dir}/failures.jsonl):",
            *reasons,
            sep="\n  ",
            file=sys.stderr,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()

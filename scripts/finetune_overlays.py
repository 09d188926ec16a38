"""Before and after a fine-tune, for a person to look at: each labelled image with its labels, the cells the model
it started from finds, and those the fine-tuned model finds, where each image is segmented by the fold model that
never trained on it (train --folds), with SEG and the Kaggle score in each panel's title.

  python scripts/finetune_overlays.py --base model_store/sartorius-w16-v3 --tuned model_store/lab-u373 \
      --data ../shared/data/lab-u373 --out docs/finetune-u373.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from app.ml.celltypes import image_contrast
from app.ml.checkpoint import load_checkpoint
from app.ml.data.labelled import open_labelled
from app.ml.options import InferenceOptions, Mode
from app.ml.outputs import overlay
from app.ml.scoring.folds import out_of_fold_maps
from app.ml.scoring.metric import image_score, seg_jaccards
from app.ml.serving.predictor import Predictor


def predictor(folder: Path) -> Predictor:
    return Predictor.from_checkpoint(folder, InferenceOptions.float32())


def scores(truth: np.ndarray, found: np.ndarray) -> str:
    return (
        f"{int(found.max())} cells, SEG {seg_jaccards(truth, found).mean():.3f}, Kaggle {image_score(truth, found):.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the model the fine-tune started from")
    parser.add_argument("--tuned", required=True, help="the cross-validated fine-tuned model (with its folds/)")
    parser.add_argument("--data", required=True, nargs="+", help="the labelled folders it was trained on")
    parser.add_argument("--cell-type", help="as train's --cell-type")
    parser.add_argument("--images", type=int, default=3, help="how many images to show")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    dataset = open_labelled(args.data, args.cell_type)
    tuned_rules = load_checkpoint(args.tuned).card.postprocessing
    scored = out_of_fold_maps(Path(args.tuned), dataset, predictor)[: args.images]
    base = predictor(Path(args.base))
    figure, axes = plt.subplots(len(scored), 3, figsize=(15, 5 * len(scored)), squeeze=False)
    for row, (sample, maps) in zip(axes, scored, strict=True):
        before = base.predict(sample.image, Mode.AUTO).labels
        after = tuned_rules.find(maps, image_contrast(sample.image)).labels
        panels = [
            (f"{sample.image_id}: labels, {int(sample.labels.max())} cells", sample.labels),
            (f"{base.version}: {scores(sample.labels, before)}", before),
            (f"fine-tuned, out of fold: {scores(sample.labels, after)}", after),
        ]
        for axis, (title, labels) in zip(row, panels, strict=True):
            axis.imshow(overlay(sample.image, labels))
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

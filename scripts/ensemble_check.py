"""Score an ensemble of models on their shared validation split: the instance step's maps averaged over the models,
then the whole instance step chosen on them as `tune` does. A measurement for docs/training.md, not a feature: the
service serves one model.

    python scripts/ensemble_check.py --data ../shared/data/sartorius-reconstructed ../shared/data/sartorius \
        --models model_store/sartorius-w16-v3 OTHER_MODEL_FOLDER
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from app.ml.checkpoint import load_checkpoint
from app.ml.data.labelled import open_labelled
from app.ml.data.split import Split, load_split
from app.ml.options import InferenceOptions
from app.ml.postprocess import InstanceConfig
from app.ml.scoring.evaluation import instance_step_maps
from app.ml.scoring.tuning import tune_rules
from app.ml.serving.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    args = parser.parse_args()
    checkpoints = [load_checkpoint(folder) for folder in args.models]
    if len({json.dumps(c.split, sort_keys=True) for c in checkpoints}) != 1:
        raise SystemExit("the models were trained on different splits: their validation scores do not compare")
    train, validation = load_split(open_labelled(args.data), Split.from_dict(checkpoints[0].split))
    predictors = [Predictor.from_checkpoint(c, InferenceOptions.float32()) for c in checkpoints]

    def averaged(samples: list) -> list:
        return [(s, np.mean([instance_step_maps(p, s.image) for p in predictors], axis=0)) for s in samples]

    _, evaluation = tune_rules(averaged(train), averaged(validation), InstanceConfig())
    models = [c.version for c in checkpoints]
    print(json.dumps({"models": models, "validation": evaluation.score, "per_cell_type": evaluation.per_cell_type}))


if __name__ == "__main__":
    main()

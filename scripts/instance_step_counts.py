"""Counts behind two choices of the instance step, on the default model's maps (float32, auto mode, on the CPU) of
the four sample images, each with the thresholds its rules pick (docs/performance.md):

- the reference (app.ml.postprocess): the seed candidates' share of the image (seed sizes are counted over them
  alone), and how many fewer foreground pixels go through the watershed's queue once the seeds' inner pixels are
  left out;
- the torch step (app.ml.serving.gpu_instances): the share of the foreground that gets the reference's label when
  the flood runs in 64 levels (FLOOD_LEVELS) and in 32.

Run from the project root: python -m scripts.instance_step_counts   (a few seconds)
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.ml.checkpoint import resolve_model_folder
from app.ml.imageio import read_image
from app.ml.options import InferenceOptions
from app.ml.postprocess import _inner_pixels, _seeds, maps_to_instances
from app.ml.serving import gpu_instances
from app.ml.serving.predictor import Predictor
from tests.conftest import SARTORIUS
from tests.ml.test_gpu_instances import foreground_agreement


def main() -> None:
    torch.set_num_threads(1)
    predictor = Predictor.from_checkpoint(resolve_model_folder("model_store"), InferenceOptions.float32())
    for path in [SARTORIUS / "train" / "0030fd0e6378.png", *sorted((SARTORIUS / "test").glob("*.png"))]:
        image = read_image(path)
        prepared = predictor.prepare(image, "auto")
        maps = predictor.maps(prepared, predictor.run_tiles(prepared.tiles))
        rules = predictor.rules
        config, _, _ = rules.choose(maps, prepared.contrast)
        foreground = maps[0] > config.foreground_threshold
        candidates = (maps[1] > config.seed_threshold) & foreground
        inner = _inner_pixels(_seeds(maps[1] > config.seed_threshold, foreground, config.min_seed_area) > 0)
        queued = int((foreground & ~inner).sum())
        reference = rules.find(maps, prepared.contrast, step=maps_to_instances).labels
        agreement = {}
        for levels in (64, 32):
            gpu_instances.FLOOD_LEVELS = levels
            found = rules.find(torch.from_numpy(maps), prepared.contrast, step=gpu_instances.maps_to_instances_torch)
            agreement[levels] = foreground_agreement(reference, found.labels)
        print(
            f"{Path(path).stem}: seed candidates {candidates.mean():.1%} of the image; watershed queue "
            f"{int(foreground.sum())} -> {queued} pixels ({1 - queued / foreground.sum():.0%} fewer); foreground with "
            f"the reference's label: {agreement[64]:.2%} at 64 levels, {agreement[32]:.2%} at 32"
        )


if __name__ == "__main__":
    main()

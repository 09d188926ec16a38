"""Cells found by each bundled model on the real images without full labels: the left part of 0030fd0e6378 (with
the number matched to its 247 true cells at IoU > 0.5) and the 3 competition test images (with the type read).

Run from the project root: python scripts/compare_models.py (resize mode, float32, on the CPU).
"""

from pathlib import Path

from app.ml.data.labelled import open_labelled
from app.ml.imageio import read_image
from app.ml.options import InferenceOptions
from app.ml.scoring.metric import iou_matrix
from app.ml.serving.predictor import Predictor

sample = open_labelled(["../shared/data/sartorius"]).load(0)
for version in sorted(p.name for p in Path("model_store").iterdir() if (p / "model.json").is_file()):
    pred = Predictor.from_checkpoint(f"model_store/{version}", InferenceOptions.float32())
    found = pred.predict(sample.image)
    iou = iou_matrix(sample.labels, found.labels)[1:, 1:]
    matched = int((iou > 0.5).sum())
    row = [f"{int(found.labels.max())} cells, {matched} matched"]
    for image in sorted(Path("../shared/data/sartorius/test").glob("*.png")):
        cells = pred.predict(read_image(image))
        read_as = f" ({cells.cell_type}, {cells.cell_type_probability:.0%})" if cells.cell_type else ""
        row.append(f"{int(cells.labels.max())}{read_as}")
    print(version, sample.image_id, int(sample.labels.max()), "true |", " | ".join(row))

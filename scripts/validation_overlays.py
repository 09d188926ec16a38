"""docs/validation-overlays.png: two validation images of the default model, the truth beside its cells (`train`'s own
overlay figure, in the service's colours): the cortical-neuron image 0ba181d412da and the densely packed astrocyte
image 91c06d4f10df.

Run from the project root: python scripts/validation_overlays.py (resize mode, float32, on the CPU).
"""

from pathlib import Path

from app.ml.checkpoint import resolve_model_folder
from app.ml.data.labelled import open_labelled
from app.ml.options import InferenceOptions
from app.ml.serving.predictor import Predictor
from app.ml.training.plots import save_overlays

IMAGES = ("0ba181d412da", "91c06d4f10df")
DATA = open_labelled(["../shared/data/sartorius-reconstructed"])

predictor = Predictor.from_checkpoint(resolve_model_folder("model_store"), InferenceOptions.float32())
index = {image_id: i for i, image_id in enumerate(DATA.image_ids)}
rows = []
for image_id in IMAGES:
    sample = DATA.load(index[image_id])
    cells = predictor.predict(sample.image).labels
    rows.append((f"{image_id} ({sample.cell_type})", sample.image, sample.labels, cells))
save_overlays(rows, Path("docs/validation-overlays.png"))
print("wrote docs/validation-overlays.png")

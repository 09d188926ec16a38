"""`train`'s options: one dataclass, saved in last.pt and model.json, so a run can be resumed and reproduced."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from app.ml.transforms import PreprocessConfig
from app.ml.unet import NUM_CLASSES, UNetConfig

SCALES = ("resize", "native", "cells")


@dataclass
class TrainConfig:
    """Every option of `train` (app/train.py explains each one)."""

    data: list[str]
    out: str = "model_store"
    version: str = ""
    seed: int = 0
    epochs: int = 30
    epoch_size: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    width: int = 16
    depth: int = 4
    paper: bool = False
    input_size: int = 572
    scale: str = "resize"
    reference_size: str = ""
    cell_diameter: float = 0.0
    tile_size: int = 512
    border_width: int = 1
    w0: float = 10.0
    sigma: float = 5.0
    dice_weight: float = 0.0
    centre: bool = False
    centre_weight: float = 1.0
    crop: int = 256
    elastic_std: float = 10.0
    augment: bool = True
    unlabelled_edges: bool = False
    val_fraction: float = 0.2
    holdout_rows: float = 0.0
    folds: int = 0
    val_every: int = 1
    tune_thresholds: bool = True
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0
    torch_threads: int = 0
    checkpoint_every: int = 50
    set_default: bool = False
    init: str = ""
    oversample: str = ""
    cell_type: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if isinstance(values.get("data"), str):  # runs saved before several folders were accepted
            values["data"] = [values["data"]]
        return cls(**values)

    def draws(self, cell_types: list[str]) -> list[int]:
        """How often each training image (of these cell types) is drawn per round: --oversample 'astro=3,cort=2'
        draws the images of those types that many times, every other image once."""
        counts = {}
        for part in filter(None, self.oversample.split(",")):
            name, _, times = part.partition("=")
            if not times.strip().isdigit() or int(times) < 1:
                raise ValueError(f"--oversample takes TYPE=TIMES[,TYPE=TIMES...] with whole TIMES >= 1, not {part!r}")
            counts[name.strip()] = int(times)
        return [counts.get(cell_type, 1) for cell_type in cell_types]

    def architecture(self) -> UNetConfig:
        """--paper keeps the paper's unpadded convolutions; batch norm stays on, as it trains faster."""
        return UNetConfig(
            in_channels=1,
            num_classes=NUM_CLASSES,
            base_width=self.width,
            depth=self.depth,
            padded=not self.paper,
            centre=self.centre,
        )

    def preprocess(self, first_image_shape: tuple[int, int], cell_diameter: float) -> PreprocessConfig:
        """The pixel scale the network works at, relative to the images' own pixels:
        - 'resize': the scale the service's resize mode gives images of the reference size (default: the first
          image's own size);
        - 'native': the images' own pixels (for tile mode);
        - 'cells': the scale at which the labelled cells' median diameter (`cell_diameter`, in the images' pixels)
          becomes --cell-diameter, as Cellpose rescales to its models' mean diameter: cells of another size are
          seen at the size the network learnt cells at, and auto mode then tiles at that scale."""
        architecture = self.architecture()
        margin = math.ceil(architecture.receptive_radius() / architecture.stride) * architecture.stride
        if self.scale == "native":
            pixel_scale = (1.0, 1.0)
        elif self.scale == "cells":
            if self.cell_diameter <= 0 or cell_diameter <= 0:
                raise ValueError("--scale cells needs --cell-diameter (the size to see cells at) and labelled cells")
            factor = self.cell_diameter / cell_diameter
            pixel_scale = (factor, factor)
        else:
            ref = parse_size(self.reference_size) if self.reference_size else first_image_shape
            pixel_scale = (self.input_size / ref[0], self.input_size / ref[1])
        return PreprocessConfig(
            input_size=self.input_size, pixel_scale=pixel_scale, tile_size=self.tile_size, tile_margin=margin
        )


def parse_size(text: str) -> tuple[int, int]:
    """'520x704' (height x width) -> (520, 704)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a size as HEIGHTxWIDTH such as 520x704, got {text!r}") from None
    return height, width

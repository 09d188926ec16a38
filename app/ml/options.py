"""The named choices of inference, without torch: the settings, the CLIs and the API validate against these."""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from app.ml.errors import InvalidOptionError

_Option = TypeVar("_Option", bound=StrEnum)

# Test-time augmentation: how many views of each network input may be averaged (1: off; 2: and its left-right flip;
# 4: the flips; 8: the flips and quarter turns).
TTA_CHOICES = (1, 2, 4, 8)


class Backend(StrEnum):
    """What runs the network: PyTorch (CPU or CUDA), or ONNX Runtime on the CPU (optional). auto: PyTorch on CUDA,
    on CPUs that compute in bfloat16 natively, and wherever torch.compile is on; ONNX Runtime on other CPUs when
    it is installed."""

    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


class Mode(StrEnum):
    """resize: the model card's 572x572 and back. tile: overlap-tile at the model's training pixel scale.
    auto: resize for images near the size the model was trained at, tile for much larger or smaller ones."""

    AUTO = "auto"
    RESIZE = "resize"
    TILE = "tile"


class DeviceSteps(StrEnum):
    """Which steps around the network run in torch on the network's device. none: all on the CPU (numpy, scipy,
    scikit-image: the reference). resize: normalization, the resizes, the tiles and the instance step's maps there,
    then the maps come to the CPU for the instance step. all: the instance step there too (only labels come back).
    auto: resize on CUDA, none on the CPU."""

    AUTO = "auto"
    NONE = "none"
    RESIZE = "resize"
    ALL = "all"


def parse_option(kind: type[_Option], value: _Option | str, name: str) -> _Option:
    """`value` as a member of `kind`; InvalidOptionError naming the accepted values otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise InvalidOptionError(f"unknown {name} {value!r}; accepted: {', '.join(kind)}") from None

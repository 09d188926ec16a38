"""How a model runs, without torch: the named choices of inference and the one options object that carries them.

InferenceOptions is built once, from the service's Settings (`Settings.inference`) or a CLI's arguments
(`app.cli.inference_options`), and passed whole to the predictor; its fields are the settings' names (CELLSEG_<NAME>,
--<name>) and its defaults the service's. What a predictor makes of them on its machine (the device picked, the
backend auto chose, whether reduced precision and compiling apply there) is the same type again: `Predictor.options`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import TypeVar

from app.ml.errors import InvalidOptionError

_Option = TypeVar("_Option", bound=StrEnum)

# Test-time augmentation: the views averaged per network input, as (quarter turns, left-right flip), by their count:
# 1 (off), 2 (and its left-right flip), 4 (the flips: none, left-right, up-down, both), or 8 (every symmetry of the
# square, for square network inputs: resize mode and tiles always are).
TTA_VIEWS: dict[int, list[tuple[int, bool]]] = {
    1: [(0, False)],
    2: [(0, False), (0, True)],
    4: [(0, False), (0, True), (2, True), (2, False)],
    8: [(turns, flip) for turns in range(4) for flip in (False, True)],
}
TTA_CHOICES = tuple(TTA_VIEWS)


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


@dataclass(frozen=True)
class InferenceOptions:
    """Where and how the network runs; Settings and docs/operations.md say what each one does.

    device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'. half_precision: reduced precision where the
    model allows it and the hardware has it (float16 on CUDA, bfloat16 on CPUs that compute it natively); what it
    comes to is the predictor's `precision`. compile: torch.compile the network while warming up (PyTorch on the
    CPU); whether shapes were compiled is the predictor's `compiled`. tta: views averaged per network input
    (TTA_CHOICES). torch_threads: torch's CPU threads (0: torch's default). steps_on_device: DeviceSteps.
    """

    device: str = "auto"
    backend: Backend = Backend.AUTO
    half_precision: bool = True
    compile: bool = True
    tta: int = 1
    torch_threads: int = 0
    steps_on_device: DeviceSteps = DeviceSteps.AUTO

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: the checked values replace the given ones once, here
        set_field(self, "device", str(self.device))  # a torch.device too
        set_field(self, "backend", parse_option(Backend, self.backend, "backend"))
        set_field(self, "steps_on_device", parse_option(DeviceSteps, self.steps_on_device, "steps_on_device"))
        if self.tta not in TTA_VIEWS:
            raise InvalidOptionError(
                f"tta={self.tta}: test-time augmentation takes {', '.join(map(str, TTA_CHOICES))} views"
            )
        if self.torch_threads < 0:
            raise InvalidOptionError(f"torch_threads={self.torch_threads}: 0 (torch's default) or more")

    @classmethod
    def float32(cls, device: str = "cpu") -> InferenceOptions:
        """The model's own numbers: float32 in PyTorch, uncompiled, one view, as `train` validates and the model
        card's scores were computed."""
        return cls(device=device, backend=Backend.TORCH, half_precision=False, compile=False)

    def as_settings(self) -> dict[str, str]:
        """name -> value as the environment gives it (CELLSEG_<NAME>): to start a service with these options."""
        values = {name: getattr(self, name) for name in OPTION_NAMES}
        return {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in values.items()}


OPTION_NAMES = tuple(field.name for field in fields(InferenceOptions))

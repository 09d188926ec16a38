"""The U-Net of Ronneberger et al. 2015 (arXiv 1505.04597), configurable.

`UNetConfig.paper()` is the paper's network: unpadded 3x3 convolutions, 64..1024 channels, 23 conv layers,
572x572 in -> 388x388 out. `padded=True` gives the variant whose output has its input's size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from app.ml.strict import from_fields

# What the outputs mean. Channels 0..num_classes-1 are class logits: background, cell interior, and the border
# that separates touching cells. A centre model has one more channel after them: each cell's centre map (its
# distance to its own edge, 1 at the centre), through a sigmoid, that the watershed seeds from.
BACKGROUND, INTERIOR, BORDER = 0, 1, 2
NUM_CLASSES = 3
CENTRE = 3


@dataclass(frozen=True)
class UNetConfig:
    """Plain data that rebuilds the same network; saved beside the weights in model.json."""

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    base_width: int = 16
    depth: int = 4
    padded: bool = True
    batch_norm: bool = True
    centre: bool = False  # one more output after the classes: the centre map (CENTRE)

    @classmethod
    def paper(cls) -> UNetConfig:
        """The network of the paper's Figure 1 (two classes, no batch norm)."""
        return cls(in_channels=1, num_classes=2, base_width=64, depth=4, padded=False, batch_norm=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        return from_fields(cls, data, "architecture")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def outputs(self) -> int:
        """Output channels: the class logits, then the centre map's logit when the model has one."""
        return self.num_classes + int(self.centre)

    @property
    def stride(self) -> int:
        """Input sides of the padded network must be multiples of this (one halving per level)."""
        return 2**self.depth

    def output_size(self, input_size: int) -> int:
        """Side of the output for a square input of this side; raises ValueError for invalid sizes."""
        if self.padded:
            if input_size % self.stride:
                raise ValueError(f"padded U-Net inputs must be multiples of {self.stride}, got {input_size}")
            return input_size
        size = input_size
        for _ in range(self.depth):
            size -= 4
            if size <= 0 or size % 2:
                raise ValueError(f"{input_size} is not a valid input size for the unpadded U-Net; try 572")
            size //= 2
        size -= 4
        for _ in range(self.depth):
            size = size * 2 - 4
        if size <= 0:
            raise ValueError(f"{input_size} is too small for the unpadded U-Net; try 572")
        return size

    def receptive_radius(self) -> int:
        """How far (in input pixels) one output pixel can see: the margin that makes tiling exact."""
        down = sum(2**level * (2 * 2 + 1) for level in range(self.depth))  # two 3x3 convs + one pool
        bottom = 2**self.depth * 2 * 2
        up = sum(2**level * (2 * 2 + 1) for level in range(self.depth))  # one 2x2 up-conv + two 3x3 convs
        return (down + bottom + up) // 2 + 1


class DoubleConv(nn.Module):
    """(conv 3x3 -> [BN] -> ReLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int, padded: bool, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for channels in (in_ch, out_ch):
            layers.append(nn.Conv2d(channels, out_ch, 3, padding=int(padded), bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """Max-pool 2x2, then DoubleConv: one step down the contracting path."""

    def __init__(self, in_ch: int, out_ch: int, padded: bool, batch_norm: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch, padded, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Up-conv 2x2 halving the channels, concatenate the (cropped) skip, DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int, padded: bool, batch_norm: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = DoubleConv(out_ch * 2, out_ch, padded, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))


def center_crop(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Crop the last two dims of x to `size`, centred (the paper's copy-and-crop)."""
    top = (x.shape[-2] - size[0]) // 2
    left = (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


def to_probabilities(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, outputs, H, W) logits -> probabilities: a softmax over the classes, a sigmoid over the centre map."""
    classes = torch.softmax(logits[:, :num_classes], dim=1)
    if logits.shape[1] == num_classes:
        return classes
    return torch.cat((classes, torch.sigmoid(logits[:, num_classes:])), dim=1)


class UNet(nn.Module):
    """(N, C_in, H, W) float32 -> (N, outputs, H', W') logits; H' = H when padded, H - 184 for the paper."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_width * 2**level for level in range(config.depth + 1)]
        args = (config.padded, config.batch_norm)
        self.inc = DoubleConv(config.in_channels, widths[0], *args)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], *args) for i in range(config.depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], *args) for i in reversed(range(config.depth)))
        self.outc = nn.Conv2d(widths[0], config.outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

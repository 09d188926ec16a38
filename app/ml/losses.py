"""The paper's pixel-weighted cross-entropy, with an optional soft Dice term on the foreground."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.ml.targets import BACKGROUND


def weighted_cross_entropy(logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits, (N, H, W) int64 classes, (N, H, W) float weights -> scalar.

    The mean of w(x) * -log p(x) over pixels whose weight is not zero (mirrored padding has zero weight).
    """
    per_pixel = F.cross_entropy(logits.float(), classes, reduction="none")
    counted = (weights > 0).sum().clamp(min=1)
    return (per_pixel * weights).sum() / counted


def soft_dice(logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """1 - Dice of the predicted and true foreground (interior + border), over counted pixels."""
    foreground = 1.0 - torch.softmax(logits.float(), dim=1)[:, BACKGROUND]
    truth = (classes != BACKGROUND).float()
    mask = (weights > 0).float()
    overlap = (foreground * truth * mask).sum()
    total = (foreground * mask).sum() + (truth * mask).sum()
    return 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)


def segmentation_loss(
    logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor, dice_weight: float = 0.0
) -> torch.Tensor:
    loss = weighted_cross_entropy(logits, classes, weights)
    if dice_weight:
        loss = loss + dice_weight * soft_dice(logits, classes, weights)
    return loss

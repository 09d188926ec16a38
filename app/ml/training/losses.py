"""The paper's pixel-weighted cross-entropy, with an optional soft Dice term on the foreground, and a binary
cross-entropy on the centre map for models that predict one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.ml.unet import BACKGROUND, CENTRE, NUM_CLASSES


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


def centre_loss(logits: torch.Tensor, centre: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, H, W) centre-map logits and targets in [0, 1] -> binary cross-entropy over counted pixels."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), centre, reduction="none")
    mask = (weights > 0).float()
    return (per_pixel * mask).sum() / mask.sum().clamp(min=1)


def segmentation_loss(
    logits: torch.Tensor,
    classes: torch.Tensor,
    weights: torch.Tensor,
    centre: torch.Tensor,
    dice_weight: float = 0.0,
    centre_weight: float = 1.0,
) -> torch.Tensor:
    """Weighted cross-entropy on the class logits (+ soft Dice), + the centre map's loss where the model has one
    (logits with a channel after the classes)."""
    class_logits = logits[:, :NUM_CLASSES]
    loss = weighted_cross_entropy(class_logits, classes, weights)
    if dice_weight:
        loss = loss + dice_weight * soft_dice(class_logits, classes, weights)
    if logits.shape[1] > NUM_CLASSES:
        loss = loss + centre_weight * centre_loss(logits[:, CENTRE], centre, weights)
    return loss

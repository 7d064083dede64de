"""SAM's training losses: focal + dice on masks, MSE on the predicted IoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over pixels: (..., H, W) -> (...)."""
    probs = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss on sigmoid probabilities: (..., H, W) -> (...)."""
    probs = torch.sigmoid(logits).flatten(-2)
    targets = targets.flatten(-2)
    overlap = (probs * targets).sum(-1)
    return 1 - (2 * overlap + eps) / (probs.sum(-1) + targets.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded logits with binary targets: (..., H, W) -> (...); empty/empty = 1."""
    predicted = logits > 0
    truth = targets > 0.5
    intersection = (predicted & truth).flatten(-2).sum(-1).float()
    union = (predicted | truth).flatten(-2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def sam_loss(
    logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    targets: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Loss of one round for M objects with K output masks each.

    Args:
        logits: (M, K, h, w) mask logits.
        iou_predictions: (M, K) predicted IoU.
        targets: (M, h, w) ground truth in [0, 1].

    With K > 1 (an ambiguous single prompt) only the output with the lowest mask
    loss is trained, per object; the IoU head learns every output's actual IoU.

    Returns:
        The scalar loss, its parts (detached means), and (M,) index of the output
        chosen per object.
    """
    targets = targets[:, None].expand_as(logits).to(logits.dtype)
    logits = logits.float()
    focal = focal_loss(logits, targets.float())
    dice = dice_loss(logits, targets.float())
    mask_loss = focal_weight * focal + dice_weight * dice
    best = mask_loss.argmin(dim=1)
    rows = torch.arange(len(best), device=best.device)
    actual_iou = mask_iou(logits.detach(), targets)
    iou_loss = F.mse_loss(iou_predictions.float(), actual_iou, reduction="none").mean(dim=1)
    total = (mask_loss[rows, best] + iou_weight * iou_loss).mean()
    parts = {
        "focal": focal[rows, best].mean().detach(),
        "dice": dice[rows, best].mean().detach(),
        "iou_mse": iou_loss.mean().detach(),
        "iou": actual_iou[rows, best].mean(),
    }
    return total, parts, best

"""Prompt simulation for interactive training (SAM paper, appendix A).

All coordinates are in the model's input frame (pixels of the resized image),
(x, y) = (column, row) of a pixel, as users give them.
"""

from __future__ import annotations

import torch


def random_pixels(
    regions: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pixel drawn uniformly from each region.

    Args:
        regions: (M, H, W) bool; rows without any True pixel get an arbitrary pixel.

    Returns:
        (M, 2) float (x, y) coordinates and (M,) bool "region was non-empty".
    """
    flat = regions.flatten(1).float()
    has_pixels = flat.sum(dim=1) > 0
    weights = torch.where(has_pixels[:, None], flat, torch.ones_like(flat))
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    width = regions.shape[-1]
    coords = torch.stack([index % width, torch.div(index, width, rounding_mode="floor")], dim=1)
    return coords.float(), has_pixels


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(M, H, W) bool -> (M, 4) XYXY boxes of the outermost pixels (inclusive)."""
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    height, width = masks.shape[-2:]
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    y0 = torch.where(rows, ys, height).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    x0 = torch.where(cols, xs, width).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def noisy_boxes(
    masks: torch.Tensor,
    generator: torch.Generator,
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> torch.Tensor:
    """Tight boxes of ``masks`` with each coordinate jittered.

    The noise has a standard deviation of ``noise_fraction`` of the box side,
    clipped to ``max_noise`` pixels, as in the paper. Returns (M, 4) XYXY inside the frame.
    """
    boxes = mask_boxes(masks)
    sides = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=generator) * noise_fraction * sides
    boxes = boxes + noise.clamp(-max_noise, max_noise)
    height, width = masks.shape[-2:]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    low = torch.minimum(boxes[:, :2], boxes[:, 2:])
    high = torch.maximum(boxes[:, :2], boxes[:, 2:])
    return torch.cat([low, high], dim=1)


def error_points(
    predicted: torch.Tensor,
    target: torch.Tensor,
    stride: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next click of each mask, uniform over the error region of the previous prediction.

    Args:
        predicted: (M, h, w) bool prediction on the low-res grid.
        target: (M, h, w) bool ground truth on the same grid.
        stride: model-frame pixels per low-res cell.

    Returns:
        (M, 2) (x, y) clicks in the model frame, and (M,) labels: 1 on a missed
        object pixel (false negative), 0 on a wrong one (false positive), -1 (no
        click: "not a point") when the prediction is already perfect.
    """
    false_negative = target & ~predicted
    errors = false_negative | (predicted & ~target)
    cells, has_error = random_pixels(errors, generator)
    rows, cols = cells[:, 1].long(), cells[:, 0].long()
    is_foreground = false_negative[torch.arange(len(cells)), rows, cols]
    offset = torch.rand(cells.shape, generator=generator) * stride
    coords = cells * stride + offset.floor()
    labels = torch.where(has_error, is_foreground.long(), torch.full_like(rows, -1))
    return coords, labels


def round_schedule(rounds: int, generator: torch.Generator, without_click: int = 2) -> list[bool]:
    """Whether each round after the first adds a click.

    The paper's 11 rounds: the first prompt, 8 sampled clicks and ``without_click``
    = 2 rounds that only refine with the model's own previous mask, one at a
    random place among the clicks and one at the end.
    """
    without_click = min(without_click, rounds - 1)
    clicks = rounds - 1 - without_click
    schedule = [True] * clicks
    if without_click >= 2:
        for _ in range(without_click - 1):
            place = int(torch.randint(0, len(schedule) + 1, (1,), generator=generator))
            schedule.insert(place, False)
    if without_click >= 1:
        schedule.append(False)
    return schedule

"""Turning a dataset sample into a training item at the model's input size.

The image is scaled so its long side is ``img_size`` times a random factor
(scale jitter), flipped, cropped to at most ``img_size`` and colour-jittered;
the same geometry is applied to the chosen masks. Like SAM at inference, the
image is not padded here: ``Sam.preprocess`` pads bottom/right.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .config import AugmentSection


@dataclass
class TrainItem:
    """One image and its masks, ready for a training step.

    Attributes:
        image: (3, h, w) uint8, max(h, w) <= img_size, not padded.
        masks: (M, img_size, img_size) bool, zero beyond (h, w).
        image_id: for messages.
    """

    image: torch.Tensor
    masks: torch.Tensor
    image_id: str


def _resize(array: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """cv2.resize for (H, W) or (H, W, C) arrays, any C (cv2 handles at most 512 channels)."""
    height, width = size
    if array.ndim == 3 and array.shape[2] > 512:
        parts = [
            _resize(array[..., i : i + 512], size, interpolation)
            for i in range(0, array.shape[2], 512)
        ]
        return np.concatenate([p.reshape(height, width, -1) for p in parts], axis=2)
    out = cv2.resize(array, (width, height), interpolation=interpolation)
    return out.reshape(height, width, -1) if array.ndim == 3 else out


def _color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s]."""
    if strength <= 0:
        return image
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    out = image.astype(np.float32) * brightness
    out = (out - out.mean()) * contrast + out.mean()
    gray = out.mean(axis=2, keepdims=True)
    out = (out - gray) * saturation + gray
    return np.clip(out, 0, 255).astype(np.uint8)


def copy_paste(
    item: TrainItem,
    donor: TrainItem,
    masks_per_image: int,
    min_mask_area: int,
    rng: np.random.Generator,
) -> TrainItem:
    """Paste 1 to 3 of ``donor``'s objects (their pixels and masks) onto ``item``.

    Both are in the model's frame (top-left aligned), so an object keeps its place; pixels
    beyond ``item``'s image are dropped. ``item``'s objects lose what the pasted ones cover
    and are dropped below ``min_mask_area``; at most ``masks_per_image`` masks are kept,
    the pasted ones first.
    """
    height, width = item.image.shape[-2:]
    chosen = rng.permutation(len(donor.masks))[: int(rng.integers(1, 4))]
    pasted = donor.masks[chosen].clone()
    pasted[:, height:] = False
    pasted[:, :, width:] = False
    pasted[:, donor.image.shape[-2] :] = False
    pasted[:, :, donor.image.shape[-1] :] = False
    pasted = pasted[pasted.flatten(1).sum(dim=1) >= min_mask_area]
    if len(pasted) == 0:
        return item
    cover = pasted.any(dim=0)
    visible = cover[:height, :width]
    image = item.image.clone()
    donor_h, donor_w = min(height, donor.image.shape[-2]), min(width, donor.image.shape[-1])
    region = visible[:donor_h, :donor_w]
    image[:, :donor_h, :donor_w][:, region] = donor.image[:, :donor_h, :donor_w][:, region]
    kept = item.masks & ~cover
    kept = kept[kept.flatten(1).sum(dim=1) >= min_mask_area]
    masks = torch.cat([pasted, kept])[:masks_per_image]
    return TrainItem(image=image, masks=masks, image_id=f"{item.image_id}+{donor.image_id}")


def prepare_item(
    image: np.ndarray,
    masks: np.ndarray,
    image_id: str,
    img_size: int,
    masks_per_image: int,
    min_mask_area: int,
    augment: AugmentSection,
    rng: np.random.Generator,
) -> TrainItem | None:
    """Augment one sample; None when no chosen mask keeps ``min_mask_area`` pixels.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool, one per object.
    """
    if len(masks) == 0:
        return None
    chosen = rng.permutation(len(masks))[: 2 * masks_per_image]  # spares for ones lost in cropping
    height, width = image.shape[:2]
    scale = img_size / max(height, width) * rng.uniform(*augment.scale_jitter)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = _resize(image, size, cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    stack = _resize(np.moveaxis(masks[chosen], 0, -1).astype(np.uint8), size, cv2.INTER_NEAREST)

    if augment.hflip and rng.random() < 0.5:
        resized, stack = resized[:, ::-1], stack[:, ::-1]
    if augment.vflip and rng.random() < 0.5:
        resized, stack = resized[::-1], stack[::-1]
    top = int(rng.integers(0, max(size[0] - img_size, 0) + 1))
    left = int(rng.integers(0, max(size[1] - img_size, 0) + 1))
    resized = resized[top : top + img_size, left : left + img_size]
    stack = stack[top : top + img_size, left : left + img_size]
    resized = _color_jitter(np.ascontiguousarray(resized), augment.color, rng)

    areas = stack.reshape(-1, stack.shape[-1]).sum(axis=0)
    keep = np.flatnonzero(areas >= min_mask_area)[:masks_per_image]
    if len(keep) == 0:
        return None
    h, w = resized.shape[:2]
    padded = np.zeros((len(keep), img_size, img_size), dtype=bool)
    padded[:, :h, :w] = np.moveaxis(stack[..., keep], -1, 0).astype(bool)
    return TrainItem(
        image=torch.from_numpy(resized).permute(2, 0, 1).contiguous(),
        masks=torch.from_numpy(padded),
        image_id=image_id,
    )

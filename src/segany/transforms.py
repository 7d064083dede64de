"""Resizing images and prompts to the model's input frame, NumPy and PyTorch.

The NumPy/Pillow methods live in :mod:`segany.resize` (no PyTorch needed); this
class adds their tensor versions for the PyTorch predictor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import resize


class ResizeLongestSide(resize.ResizeLongestSide):
    """:class:`segany.resize.ResizeLongestSide` plus tensor methods."""

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> (B, 3, h, w), antialiased bilinear."""
        size = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Torch version of :meth:`apply_coords` (float32 result)."""
        scale_x, scale_y = self._scale(original_size)
        coords = coords.to(torch.float).clone()
        coords[..., 0] *= scale_x
        coords[..., 1] *= scale_y
        return coords

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Torch version of :meth:`apply_boxes`."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

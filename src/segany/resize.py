"""Resizing images and prompts to the model's input frame, with NumPy and Pillow only.

SAM sees images resized so that the long side is ``target_length`` (1024), then
padded bottom/right. Prompts in original-image pixels are scaled by the same
factors. Images are resized with Pillow's bilinear filter on uint8, as the official
code does, so that inputs are bit-identical.

This module does not import PyTorch, so the ONNX Runtime predictor can use it;
:mod:`segany.transforms` adds the tensor versions.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class ResizeLongestSide:
    """Resize images and (x, y) coordinates so the long side is ``target_length``."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(h, w) after scaling (oldh, oldw) so the long side is ``long_side_length``."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8 with max(h, w) = target_length."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def _scale(self, original_size: tuple[int, ...]) -> tuple[float, float]:
        old_h, old_w = original_size[0], original_size[1]
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) pixel (x, y) of the original image -> float64 in the resized frame."""
        scale_x, scale_y = self._scale(original_size)
        coords = np.array(coords, dtype=float)
        coords[..., 0] *= scale_x
        coords[..., 1] *= scale_y
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 4) XYXY boxes -> (N, 4) in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

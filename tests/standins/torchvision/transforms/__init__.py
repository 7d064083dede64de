"""torchvision's tensor transforms that sam2's SAM2Transforms scripts (tests only).

Resize on a float tensor is torchvision's ``F.interpolate`` call (bilinear,
``align_corners=False``, antialiased: torchvision's default since 0.17).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ToTensor:
    """HWC uint8 array -> CHW float32 tensor in [0, 1]."""

    def __call__(self, pic: np.ndarray) -> torch.Tensor:
        image = torch.from_numpy(np.ascontiguousarray(pic.transpose((2, 0, 1))))
        return image.to(torch.float32).div(255)


class Resize(nn.Module):
    def __init__(self, size: list[int]) -> None:
        super().__init__()
        self.size = [int(s) for s in size]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(
            image.unsqueeze(0), self.size, mode="bilinear", align_corners=False, antialias=True
        )
        return resized.squeeze(0)


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std

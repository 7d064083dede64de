"""torchvision's PIL resize path, which segment-anything's ResizeLongestSide uses (tests only)."""

import numpy as np
from PIL import Image


def to_pil_image(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


def resize(image: Image.Image, size: list[int] | tuple[int, int]) -> Image.Image:
    # torchvision maps InterpolationMode.BILINEAR to PIL's BILINEAR and takes (h, w).
    height, width = size
    return image.resize((width, height), Image.BILINEAR)

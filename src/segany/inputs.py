"""Checking what users pass to a predictor: images and prompts (NumPy only, no PyTorch).

Conventions: coordinates are pixels of the original image, (x, y); boxes are
XYXY; point label 1 = foreground, 0 = background. Every problem is a
:class:`~segany.errors.SeganyError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import SeganyError

ArrayLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]
IMAGE_FORMATS = ("RGB", "BGR")


def as_float_array(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a finite float64 array; SeganyError naming ``name`` otherwise."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SeganyError(f"{name} must be numeric, got {type(value).__name__}") from None
    if not np.isfinite(array).all():
        raise SeganyError(f"{name} contains NaN or infinite values")
    return array


def check_image(
    image: np.ndarray, image_format: str = "RGB", model_format: str = "RGB", what: str = "image"
) -> np.ndarray:
    """The one check of an image that segany is given (the predictors, the automatic mask
    generator, the writers and drawing in :mod:`segany.images`): SeganyError unless
    ``image`` is a non-empty (H, W, 3) uint8 array in ``image_format`` ('RGB' or 'BGR');
    returns it contiguous in ``model_format`` channel order. ``what`` names it in errors.
    """
    if image_format not in IMAGE_FORMATS:
        raise SeganyError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = f"shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise SeganyError(
            f"{what} must be an (H, W, 3) RGB array, got {got}, not HxWx3; "
            "use segany.images.read_image to load a file"
        )
    if image.dtype != np.uint8:
        raise SeganyError(f"{what} must be uint8 (0-255), got {image.dtype}")
    if min(image.shape[:2]) == 0:
        raise SeganyError(f"{what} is empty (zero height or width)")
    if image_format != model_format:
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


def check_points(
    point_coords: ArrayLike | None,
    point_labels: ArrayLike | None,
    image_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray] | None:
    """Validate one prompt set's points: (N, 2) pixel coords and (N,) labels in {0, 1}.

    Points must lie inside the image (0 <= x <= W, 0 <= y <= H). Raises SeganyError.
    """
    if point_coords is None and point_labels is None:
        return None
    if point_coords is None or point_labels is None:
        raise SeganyError("point_coords and point_labels must be given together")
    coords = as_float_array(point_coords, "point_coords")
    labels = as_float_array(point_labels, "point_labels")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SeganyError(f"point_coords must have shape (N, 2), got {coords.shape}")
    if labels.ndim != 1:
        raise SeganyError(f"point_labels must have shape (N,), got {labels.shape}")
    if len(coords) != len(labels):
        raise SeganyError(
            f"{len(coords)} points but {len(labels)} labels; give one label per point"
        )
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise SeganyError(
            f"point label {labels[bad][0]:g} is not allowed: use 1 for foreground, 0 for background"
        )
    height, width = image_size
    outside = (
        (coords[:, 0] < 0) | (coords[:, 0] > width) | (coords[:, 1] < 0) | (coords[:, 1] > height)
    )
    if outside.any():
        x, y = coords[outside][0]
        raise SeganyError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
    return coords, labels.astype(np.int64)


def check_boxes(box: ArrayLike | None, image_size: tuple[int, int]) -> np.ndarray | None:
    """Validate XYXY boxes: (4,) or (B, 4), x1 >= x0, y1 >= y0, overlapping the image."""
    if box is None:
        return None
    boxes = as_float_array(box, "box")
    if boxes.shape == (4,):
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise SeganyError(
            f"box must have shape (4,) or (B, 4) as x0, y0, x1, y1; got {boxes.shape}"
        )
    for x0, y0, x1, y1 in boxes:
        if x1 < x0 or y1 < y0:
            raise SeganyError(
                f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has x1 < x0 or y1 < y0; give x0, y0, x1, y1"
            )
    height, width = image_size
    off = (boxes[:, 2] < 0) | (boxes[:, 3] < 0) | (boxes[:, 0] > width) | (boxes[:, 1] > height)
    if off.any():
        raise SeganyError(f"box {tuple(boxes[off][0])} lies outside the {width}x{height} image")
    return boxes


def check_mask_input(
    mask_input: ArrayLike | None, low_res_size: tuple[int, int]
) -> np.ndarray | None:
    """Validate low-resolution mask logits: (1, h, w) or (h, w) -> (1, h, w)."""
    if mask_input is None:
        return None
    mask = as_float_array(mask_input, "mask_input")
    if mask.shape == low_res_size:
        mask = mask[None]
    if mask.shape[-2:] != low_res_size or mask.ndim != 3:
        h, w = low_res_size
        raise SeganyError(
            f"mask_input must have shape (1, {h}, {w}) (low-res logits from a previous "
            f"prediction), got {mask.shape}"
        )
    return mask

"""Synthetic training images: random shapes on textured backgrounds.

Trained from scratch on a few hundred photographs, SAM's mask decoder first learns
to ignore its prompt (predicting the image's salient region is an easy local
minimum) and never recovers. On these images every object is a plain shape among
several others, so only the prompt tells which one is wanted: a curriculum that
teaches the decoder to follow points and boxes, and the encoder to find edges and
group colours, before the real photographs.

Each image is fully determined by (seed, index), so training runs are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .datasets import Sample

MIN_OBJECT_AREA = 40  # pixels: shapes occluded below this are dropped


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: random colours on a coarse grid, smoothly upsampled."""
    coarse = rng.random((cells, cells, 3)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: a flat colour, a gradient, stripes or blotches."""
    kind = rng.integers(4)
    base = rng.random(3).astype(np.float32)
    if kind == 0:
        out = np.broadcast_to(base, (height, width, 3)).copy()
    elif kind == 1:
        other = rng.random(3).astype(np.float32)
        angle = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        out = base + (other - base) * ramp[..., None]
    elif kind == 2:
        other = rng.random(3).astype(np.float32)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 24)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period) > 0
        out = np.where(wave[..., None], base, other)
    else:
        out = _smooth_field(rng, height, width, int(rng.integers(3, 12)))
    return out.astype(np.float32)


def shape_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) bool: an ellipse, a rotated rectangle, a polygon or a smooth blob."""
    mask = np.zeros((height, width), np.uint8)
    side = min(height, width)
    size = side * rng.uniform(0.04, 0.35)
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    kind = rng.integers(4)
    if kind == 0:
        axes = (int(size * rng.uniform(0.3, 1)), int(size * rng.uniform(0.3, 1)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    elif kind == 1:
        rect = (
            (cx, cy),
            (size * rng.uniform(0.4, 2), size * rng.uniform(0.4, 2)),
            rng.uniform(0, 90),
        )
        cv2.fillPoly(mask, [cv2.boxPoints(rect).astype(np.int32)], 1)
    elif kind == 2:
        count = int(rng.integers(3, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = size * rng.uniform(0.3, 1, count)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [points.astype(np.int32)], 1)
    else:
        box = int(size * 2) + 1
        field = cv2.resize(rng.random((5, 5)).astype(np.float32), (box, box))
        ys, xs = np.mgrid[0:box, 0:box]
        falloff = 1 - np.hypot(xs - box / 2, ys - box / 2) / (box / 2)
        blob = ((field * 0.6 + falloff) > 0.75).astype(np.uint8)
        top, left = int(cy - box / 2), int(cx - box / 2)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + box, height), min(left + box, width)
        if y1 > y0 and x1 > x0:
            mask[y0:y1, x0:x1] = blob[y0 - top : y1 - top, x0 - left : x1 - left]
    return mask.astype(bool)


def render_shapes(
    rng: np.random.Generator, height: int, width: int, max_shapes: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its object masks.

    Returns:
        (H, W, 3) uint8 RGB and (N, H, W) bool masks of the visible part of each shape
        (later shapes occlude earlier ones).
    """
    image = _texture(rng, height, width)
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(2, max_shapes + 1))):
        shape = shape_mask(rng, height, width)
        if shape.sum() < MIN_OBJECT_AREA:
            continue
        image[shape] = _texture(rng, height, width)[shape]
        masks = [m & ~shape for m in masks]
        masks.append(shape)
    sigma = rng.uniform(0, 1.2)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image = image + rng.normal(0, rng.uniform(0, 0.04), image.shape).astype(np.float32)
    kept = [m for m in masks if m.sum() >= MIN_OBJECT_AREA]
    stack = np.stack(kept) if kept else np.zeros((0, height, width), bool)
    return (image.clip(0, 1) * 255).astype(np.uint8), stack


class SyntheticShapes:
    """A data set of ``count`` synthetic images with the interface training reads.

    ``get(index)`` gives a :class:`Sample` like a real data set's; image sizes vary
    between 256 and 640 pixels a side.
    """

    format = "shapes"

    def __init__(self, count: int, seed: int = 0, name: str = "shapes") -> None:
        self.count = count
        self.seed = seed
        self.name = name

    def __len__(self) -> int:
        return self.count

    @property
    def image_ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.count)]

    def get(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, index, 7])
        height, width = (int(v) for v in rng.integers(256, 641, size=2))
        image, masks = render_shapes(rng, height, width)
        return Sample(
            image_id=f"{self.name}-{index}",
            path=Path(f"{self.name}-{index}.png"),
            image=image,
            masks=masks,
            ignore=None,
            object_names=["shape"] * len(masks),
        )

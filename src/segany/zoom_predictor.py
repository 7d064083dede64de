"""Small objects segmented again on a zoomed crop around them.

At the model's input size (1024 px for SAM, 512 for the default model) an object a few
dozen pixels wide covers a handful of cells of the low-res mask (4 input pixels each), so
its mask comes out coarse or too small: a nucleus, a face in a crowd, a street sign.
:class:`ZoomPredictor` wraps a :class:`~segany.predictor.SamPredictor`. Where the object
(the prompt box, or for clicks the box around the first candidate masks and the foreground
points) is small beside the image, it embeds a square crop ``context`` times the object's
size around it, predicts there with the prompts moved into the crop, and puts the masks
back into the full image. Where the zoomed mask reaches an edge of the crop inside the
image, the object goes on beyond the crop and the whole image's prediction is returned. A
crop costs one more image embedding; it is kept while prompts stay on the same object (as
when clicks refine it), so only the first prompt on an object pays.

Conventions as the predictor's: pixels of the original image, (x, y); XYXY boxes; label 1 =
foreground, 0 = background. Low-res logits in and out are in the full image's frame, so a
result's logits can be given back as ``mask_input``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SeganyError
from .inference.postprocess import downscale_logits, upscale_logits_fast
from .inputs import ArrayLike, check_boxes, check_image, check_mask_input, check_points
from .modeling import Sam
from .predictor import Prediction, SamPredictor, to_numpy


@dataclass(frozen=True)
class Crop:
    """A window of the image: columns x0..x1-1, rows y0..y1-1 (pixels)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def size(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N,) whether each (x, y) lies in the window (its far edges included)."""
        x, y = points[:, 0], points[:, 1]
        return (x >= self.x0) & (x <= self.x1) & (y >= self.y0) & (y <= self.y1)


def crop_around(
    region: np.ndarray, image_size: tuple[int, int], context: float, min_side: int
) -> Crop:
    """The square window ``context`` times the long side of ``region`` (XYXY), at least
    ``min_side`` pixels, centred on it and shifted to lie inside the (H, W) image (cut to
    the image where it is larger)."""
    height, width = image_size
    x0, y0, x1, y1 = (float(v) for v in region)
    side = max(context * max(x1 - x0, y1 - y0), float(min_side))
    crop_w, crop_h = min(math.ceil(side), width), min(math.ceil(side), height)
    left = int(np.clip(round((x0 + x1 - crop_w) / 2), 0, width - crop_w))
    top = int(np.clip(round((y0 + y1 - crop_h) / 2), 0, height - crop_h))
    return Crop(left, top, left + crop_w, top + crop_h)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """XYXY box (far edges exclusive) of the True pixels of an (H, W) mask; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def union_box(boxes: list[np.ndarray | None]) -> np.ndarray | None:
    """The XYXY box around the given boxes (None ones left out); None if none is given."""
    given = [box for box in boxes if box is not None]
    if not given:
        return None
    stacked = np.stack(given)
    return np.concatenate([stacked[:, :2].min(0), stacked[:, 2:].max(0)])


class ZoomPredictor:
    """A :class:`SamPredictor` that predicts small objects on a zoomed crop.

    Args:
        predictor: the predictor of the whole image (its model and precision serve the
            crops too, without a second copy of the weights).
        context: crop side over the object's long side (3: the object and as much again
            of its surroundings on each side, so the model sees what it stands out from).
        min_zoom: zoom only where the crop is at most 1/min_zoom of the image's long side,
            i.e. where it magnifies the object at least that much more than the full image.
        min_side: smallest crop side in pixels, so that a tiny object is not blown up into
            a few blurred pixels.
    """

    def __init__(
        self,
        predictor: SamPredictor,
        context: float = 3.0,
        min_zoom: float = 2.0,
        min_side: int = 48,
    ) -> None:
        if not isinstance(predictor, SamPredictor):
            raise SeganyError(
                f"zoom works with SAM's predictor (SamPredictor), got {type(predictor).__name__}"
            )
        if not context >= 1.0:
            raise SeganyError(
                f"context must be at least 1 (the crop holds the object), got {context}"
            )
        if not min_zoom > 1.0:
            raise SeganyError(f"min_zoom must be above 1, got {min_zoom}")
        if min_side < 1:
            raise SeganyError(f"min_side must be at least 1 pixel, got {min_side}")
        self.predictor = predictor
        self.context, self.min_zoom, self.min_side = float(context), float(min_zoom), int(min_side)
        # The crop's predictor shares the model and its prepared inference.
        self.crop_predictor = copy.copy(predictor)
        self.crop_predictor.reset_image()
        self.image: np.ndarray | None = None
        self.crop: Crop | None = None  # the window whose embedding crop_predictor holds

    @property
    def model(self) -> Sam:
        return self.predictor.model

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an (H, W, 3) uint8 image in ``image_format`` ('RGB' or 'BGR')."""
        pixels = check_image(image, image_format, self.predictor.model.image_format)
        self.predictor.set_image(pixels, self.predictor.model.image_format)
        self.image = pixels
        self.crop = None
        self.crop_predictor.reset_image()

    def attach_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Take the pixels of the image whose embedding the wrapped predictor already
        holds (restored with ``set_image_embedding``, as a server with an embedding
        cache does), for the crops, without embedding the image again."""
        pixels = check_image(image, image_format, self.predictor.model.image_format)
        if self.predictor.original_size != pixels.shape[:2]:
            raise SeganyError(
                f"the image is {pixels.shape[1]}x{pixels.shape[0]} but the predictor holds "
                "the embedding of another size; attach the image it was computed from"
            )
        self.image = pixels
        self.crop = None
        self.crop_predictor.reset_image()

    def predict(
        self,
        point_coords: ArrayLike | None = None,
        point_labels: ArrayLike | None = None,
        box: ArrayLike | None = None,
        mask_input: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """As :meth:`SamPredictor.predict`, zoomed where the object is small.

        Returns masks (C, H, W) bool (float logits with ``return_logits``), scores (C,) and
        low-res logits (C, 256, 256) in the full image's frame; C = 3 with
        ``multimask_output`` else 1.
        """
        if self.image is None:
            raise SeganyError("set an image with set_image before mask prediction")
        size = self.image.shape[:2]
        points = check_points(point_coords, point_labels, size)
        boxes = check_boxes(box, size)
        if boxes is not None and len(boxes) != 1:
            raise SeganyError(f"predict takes one box, got {len(boxes)}")
        mask = check_mask_input(mask_input, self.predictor._low_res_size)
        if points is None and boxes is None and mask is None:
            raise SeganyError("give a prompt: points, a box or a mask_input")

        def whole_image() -> Prediction:
            return self.predictor.predict(
                point_coords, point_labels, box, mask_input, multimask_output, return_logits=True
            )

        full = None
        region = self._prompt_region(points, boxes)
        if boxes is None:
            # Clicks or a mask alone: the object lies within the first masks (all candidates,
            # as the best-scoring one may be a part of it).
            full = whole_image()
            found = mask_box((full[0] > self.model.mask_threshold).any(axis=0))
            region = union_box([region, found])
        crop = None if region is None else self._zoom_window(region, size)
        zoomed = None
        if crop is not None:
            crop_logits, crop_scores = self._predict_on_crop(
                crop, points, boxes, mask, multimask_output
            )
            # Where the object goes on beyond the crop, the whole image knows more.
            if not self._cut_by_crop(crop_logits[int(np.argmax(crop_scores))], crop):
                full_logits, low_res = self._in_full_frame(crop_logits, crop)
                zoomed = (full_logits, crop_scores, low_res)
        logits, scores, low_res = zoomed or full or whole_image()
        masks = logits if return_logits else logits > self.model.mask_threshold
        return masks, scores, low_res

    # -- the crop ------------------------------------------------------------------------

    @staticmethod
    def _prompt_region(
        points: tuple[np.ndarray, np.ndarray] | None, boxes: np.ndarray | None
    ) -> np.ndarray | None:
        """XYXY box around the prompt box and the foreground points; None if neither."""
        around_points = None
        if points is not None and (points[1] == 1).any():
            foreground = points[0][points[1] == 1]
            around_points = np.concatenate([foreground.min(0), foreground.max(0)])
        return union_box([None if boxes is None else boxes[0], around_points])

    def _zoom_window(self, region: np.ndarray, size: tuple[int, int]) -> Crop | None:
        """The crop around ``region``, or None where it would not magnify enough."""
        crop = crop_around(region, size, self.context, self.min_side)
        if max(size) < self.min_zoom * max(crop.size):
            return None
        return crop

    def _cut_by_crop(self, crop_logits: np.ndarray, crop: Crop) -> bool:
        """Whether the mask of ``crop_logits`` (the crop's (h, w)) reaches an edge of
        ``crop`` that lies inside the image."""
        assert self.image is not None
        height, width = self.image.shape[:2]
        inside = crop_logits > self.model.mask_threshold
        edges = (
            (crop.y0 > 0, inside[0]),
            (crop.y1 < height, inside[-1]),
            (crop.x0 > 0, inside[:, 0]),
            (crop.x1 < width, inside[:, -1]),
        )
        return any(bool(cut and line.any()) for cut, line in edges)

    def _predict_on_crop(
        self,
        crop: Crop,
        points: tuple[np.ndarray, np.ndarray] | None,
        boxes: np.ndarray | None,
        mask: np.ndarray | None,
        multimask_output: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (C, h, w) of ``crop`` and scores (C,) for the prompts moved into it."""
        assert self.image is not None
        if crop != self.crop:
            self.crop = None  # in case embedding fails
            self.crop_predictor.set_image(
                np.ascontiguousarray(self.image[crop.y0 : crop.y1, crop.x0 : crop.x1]),
                self.model.image_format,
            )
            self.crop = crop
        offset = np.array([crop.x0, crop.y0], dtype=np.float64)
        coords = labels = None
        if points is not None:
            inside = crop.contains(points[0])  # clicks outside the crop say nothing of it
            if inside.any():
                coords, labels = points[0][inside] - offset, points[1][inside]
        crop_box = None if boxes is None else self._box_in_crop(boxes[0], crop)
        crop_mask = None if mask is None else self._mask_in_crop(mask, crop)
        if coords is None and crop_box is None and crop_mask is None:  # cannot happen for
            raise SeganyError("no prompt falls inside the zoomed crop")  # boxes or clicks
        logits, scores, _ = self.crop_predictor.predict(
            coords, labels, crop_box, crop_mask, multimask_output, return_logits=True
        )
        return logits, scores

    def _in_full_frame(self, logits: np.ndarray, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
        """The crop's (C, h, w) logits as the full image's (C, H, W) (each mask's lowest
        logit outside the crop) and as full-frame low-res logits (C, s, s)."""
        assert self.image is not None
        height, width = self.image.shape[:2]
        canvas = np.empty((len(logits), height, width), dtype=np.float32)
        canvas[:] = logits.reshape(len(logits), -1).min(1)[:, None, None]
        canvas[:, crop.y0 : crop.y1, crop.x0 : crop.x1] = logits
        low_res = downscale_logits(
            torch.from_numpy(canvas)[None],
            self.model.image_size,
            self.predictor.transform.get_preprocess_shape(height, width, self.model.image_size),
            self.predictor._low_res_size,
        )[0]
        return canvas, to_numpy(low_res)

    @staticmethod
    def _box_in_crop(box: np.ndarray, crop: Crop) -> np.ndarray:
        height, width = crop.size
        shifted = box - np.array([crop.x0, crop.y0, crop.x0, crop.y0], dtype=np.float64)
        return np.clip(shifted, 0, [width, height, width, height])

    def _mask_in_crop(self, mask: np.ndarray, crop: Crop) -> np.ndarray:
        """Full-frame low-res logits (1, s, s) -> the crop's low-res frame."""
        assert self.image is not None
        height, width = self.image.shape[:2]
        model_size = self.model.image_size
        resize = self.predictor.transform.get_preprocess_shape
        full = upscale_logits_fast(
            torch.from_numpy(np.asarray(mask, dtype=np.float32))[None],
            model_size,
            resize(height, width, model_size),
            (height, width),
        )
        window = full[..., crop.y0 : crop.y1, crop.x0 : crop.x1]
        crop_low_res = downscale_logits(
            window, model_size, resize(*crop.size, model_size), self.predictor._low_res_size
        )
        return to_numpy(crop_low_res[0])

"""SAM 2 image prediction: embed an image once, then decode prompts in milliseconds.

:class:`Sam2ImagePredictor` is a drop-in for Meta's
``sam2.sam2_image_predictor.SAM2ImagePredictor`` (``sam2`` 1.1.0): the same methods,
arguments and return shapes, and the attributes its users read (``_features``,
``_orig_hw``, ``_is_image_set``, ``_is_batch``, ``mask_threshold``), plus segany's
``precision=`` and ``compile=``. It runs on segany's inference layer
(:class:`~segany.inference.model.InferenceModel`): prompts without a mask input reuse
the image side prepared on the image's first decode.

Where it differs from :class:`~segany.SamPredictor`, it follows SAM 2:

* the image is squashed to ``image_size`` x ``image_size`` (aspect ratio not kept, no
  padding), so prompt coordinates scale per axis: x * S / W, y * S / H;
  ``normalize_coords=False`` takes them as fractions (0 to 1) of the width and height;
* a box enters as its two corners, points labelled 2 and 3, before the clicks;
* the masks are the low-res logits resized once, bilinearly, to the original size; the
  low-res logits returned are clamped to +-32, and thresholded masks are float32 0/1,
  as Meta returns them.

Conventions: coordinates are pixels of the original image, (x, y); boxes are XYXY; point
label 1 = foreground, 0 = background, -1 = padding of a point set in a batch of sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .build import sam2_model_name
from .errors import SeganyError
from .inference.mask_decoder import ImageSide
from .inference.model import InferenceModel
from .inference.precision import resolve_precision
from .inputs import (
    ArrayLike,
    as_float_array,
    check_boxes,
    check_image,
    check_mask_input,
    check_points,
)
from .loading import load_model
from .modeling.prompt_encoder import NOT_A_POINT
from .modeling.sam2 import Sam2
from .predictor import to_numpy

Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]
BatchPrediction = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]
Prompts = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

# SAM 2's point labels for a box's top-left and bottom-right corners.
BOX_CORNER_LABELS = (2, 3)
# Meta's predictor clamps the low-res logits it returns (they are fed back as mask input).
LOW_RES_LIMIT = 32.0


class ImageNotSetError(SeganyError, RuntimeError):
    """Prediction before an image was set: a :class:`SeganyError`, and the
    ``RuntimeError`` that Meta's predictor raises, for code that catches that."""


class Sam2ImagePredictor:
    """Computes a SAM 2 image embedding once and predicts masks for prompts on it.

    Args:
        sam_model: the SAM 2 model (on the device to run on).
        mask_threshold: logit above which a pixel is in a mask (Meta's argument).
        max_hole_area, max_sprinkle_area: Meta's removal of small holes and specks; not
            supported yet, must be 0 (Meta's default).
        precision: ``auto`` (default), ``fp32``, ``bf16`` or ``fp16``; see
            :mod:`segany.inference.precision`. ``fp32`` gives Meta's numbers.
        compile: run the image encoder through ``torch.compile``.
    """

    def __init__(
        self,
        sam_model: Sam2,
        mask_threshold: float = 0.0,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        if not isinstance(sam_model, Sam2):
            raise SeganyError(
                f"Sam2ImagePredictor takes a SAM 2 model (Sam2), got {type(sam_model).__name__}; "
                "use SamPredictor for SAM"
            )
        if max_hole_area > 0 or max_sprinkle_area > 0:
            raise SeganyError(
                "max_hole_area and max_sprinkle_area (removing small holes and specks) are "
                "not supported yet; leave them 0"
            )
        self.model = sam_model
        self.mask_threshold = mask_threshold
        self.precision = resolve_precision(precision, sam_model.device, sam_model)
        self.inference = InferenceModel(sam_model, self.precision, compile)
        grid = sam_model.config.embedding_size
        # Meta's name: the feature grids, finest first (the high-resolution levels, then
        # the embedding's).
        self._bb_feat_sizes = [(4 * grid, 4 * grid), (2 * grid, 2 * grid), (grid, grid)]
        self.reset_predictor()

    @classmethod
    def from_pretrained(
        cls, model_id: str, device: str | None = None, **kwargs: Any
    ) -> Sam2ImagePredictor:
        """A predictor on official SAM 2 weights, downloaded once (SHA-256 checked).

        ``model_id``: Meta's Hugging Face id (``facebook/sam2.1-hiera-tiny``, as Meta's
        ``from_pretrained`` takes), or any other name of the model (``sam2.1_t``,
        ``sam2.1_hiera_t``, ...). ``device``: ``cpu``, ``cuda`` or None for the best one;
        ``kwargs`` go to the constructor.
        """
        name = sam2_model_name(model_id)
        if name is None:
            raise SeganyError(
                f"{model_id!r} is not a SAM 2 model; use e.g. facebook/sam2.1-hiera-tiny "
                "or sam2.1_t"
            )
        model = load_model(name, device=device)
        assert isinstance(model, Sam2)
        return cls(model, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def _features(self) -> dict[str, Any] | None:
        """The image(s)' features as Meta's predictor keeps them, or None: ``image_embed``
        (B, C, h, w) and ``high_res_feats`` [(B, C/8, 4h, 4w), (B, C/4, 2h, 2w)], float32."""
        return self._feature_dict

    @_features.setter
    def _features(self, features: dict[str, Any] | None) -> None:
        # Code that caches Meta's features assigns them too (with _orig_hw and
        # _is_image_set): the decoder's copies and the prepared image sides must follow.
        decoder_embedding, decoder_high_res = None, None
        if features is not None:
            embedding, high_res = self._checked_features(features)
            decoder_embedding = self.inference.decoder_input(embedding)
            decoder_high_res = [self.inference.decoder_input(f) for f in high_res]
        self._feature_dict = features
        self._decoder_embedding: torch.Tensor | None = decoder_embedding
        self._decoder_high_res: list[torch.Tensor] | None = decoder_high_res
        self._image_sides: dict[int, ImageSide | None] = {}

    def _checked_features(self, features: dict[str, Any]) -> tuple[torch.Tensor, list[Any]]:
        """The embedding and high-resolution features of a ``_features`` dict, checked
        against the model's shapes."""
        try:
            embedding, high_res = features["image_embed"], list(features["high_res_feats"])
        except (TypeError, KeyError):
            raise SeganyError(
                "_features must be a dict with 'image_embed' and 'high_res_feats', "
                "as Meta's predictor keeps them"
            ) from None
        dim = self.model.config.embed_dim
        levels = zip((dim // 8, dim // 4, dim), self._bb_feat_sizes, strict=True)
        expected = [(len(embedding), channels, *grid) for channels, grid in levels]
        shapes = [tuple(f.shape) for f in (*high_res, embedding)]
        if shapes != expected:
            raise SeganyError(
                f"features have shapes {shapes} but this model expects {expected} "
                "(high_res_feats, then image_embed)"
            )
        return embedding, high_res

    @property
    def _low_res_size(self) -> tuple[int, int]:
        h, w = self.model.prompt_encoder.mask_input_size
        return int(h), int(w)

    def reset_predictor(self) -> None:
        """Forget the image(s) set, their features and what was prepared from them."""
        self._is_image_set = False
        self._is_batch = False
        self._features = None
        self._orig_hw: list[tuple[int, int]] | None = None

    # -- images ------------------------------------------------------------------------

    def set_image(self, image: np.ndarray | Image.Image) -> None:
        """Embed an (H, W, 3) uint8 RGB image (or a PIL image) for :meth:`predict`."""
        self._embed([_rgb_pixels(image, "image")], batch_size=1)

    def set_image_batch(
        self, image_list: Sequence[np.ndarray | Image.Image], batch_size: int = 4
    ) -> None:
        """Embed several images, ``batch_size`` at a time, for :meth:`predict_batch`."""
        if isinstance(image_list, np.ndarray) or not isinstance(image_list, Sequence):
            raise SeganyError("set_image_batch takes a list of images; use set_image for one")
        if len(image_list) == 0:
            raise SeganyError("set_image_batch needs at least one image")
        if batch_size < 1:
            raise SeganyError(f"batch_size must be at least 1, got {batch_size}")
        pixels = [_rgb_pixels(image, f"image {i}") for i, image in enumerate(image_list)]
        self._embed(pixels, batch_size)
        self._is_batch = True

    def _embed(self, images: list[np.ndarray], batch_size: int) -> None:
        """Embed checked (H, W, 3) uint8 RGB images and keep their features."""
        self.reset_predictor()
        self.inference.refresh()  # prepare again if the weights changed since
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                chunks.append(
                    self.inference.encode(torch.cat([self._preprocess(x) for x in chunk]))
                )
        embeddings, high_res = zip(*chunks, strict=True)
        self._features = {
            "image_embed": torch.cat(embeddings),
            "high_res_feats": [torch.cat(level) for level in zip(*high_res, strict=True)],
        }
        self._orig_hw = [(int(x.shape[0]), int(x.shape[1])) for x in images]
        self._is_image_set = True

    def _preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> the (1, 3, S, S) model input (squashed, normalised)."""
        image = torch.as_tensor(pixels, device=self.device).permute(2, 0, 1)[None]
        return self.model.preprocess(image)

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, C, h, w) float32 embedding of the image set ((B, ...) after a batch);
        with the high-resolution features, in :attr:`_features`."""
        self._require_image("to generate an embedding")
        return self._features["image_embed"]

    def _require_image(self, why: str = "before mask prediction", how: str = "set_image") -> None:
        if not self._is_image_set or self._orig_hw is None or self._features is None:
            raise ImageNotSetError(f"An image must be set with .{how}(...) {why}.")

    def _image_index(self, index: int) -> int:
        """The image ``index`` (negative counts from the end, as Meta's ``img_idx``) as an
        index from 0."""
        self._require_image()
        count = len(self._orig_hw)
        if not -count <= index < count:
            raise SeganyError(f"img_idx {index} is out of range for {count} images set")
        return index % count

    def _image_side(self, index: int) -> ImageSide | None:
        """Image ``index`` prepared for decoding (on its first decode, until the image
        changes or the weights do)."""
        side = self._image_sides.get(index)
        if not self.inference.is_current(side):
            side = self.inference.prepare_image(
                self._decoder_embedding[index : index + 1], self._decoder_high_res_of(index)
            )
            self._image_sides[index] = side
        return side

    def _decoder_high_res_of(self, index: int) -> list[torch.Tensor]:
        return [f[index : index + 1] for f in self._decoder_high_res]

    # -- prompts -----------------------------------------------------------------------

    def predict(
        self,
        point_coords: ArrayLike | None = None,
        point_labels: ArrayLike | None = None,
        box: ArrayLike | None = None,
        mask_input: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> Prediction:
        """Masks for prompts on the image set.

        Args:
            point_coords: (N, 2) x, y, or B sets (B, N, 2); pixels of the original image,
                or fractions 0-1 of its width and height with ``normalize_coords=False``.
            point_labels: (N,) or (B, N): 1 foreground, 0 background, -1 padding.
            box: (4,) XYXY box, or (B, 4) for B objects; same frame as the points.
            mask_input: (1, 256, 256) low-res logits from a previous call, or
                (B, 1, 256, 256), one per prompt set.
            multimask_output: three candidate masks instead of one. One mask is SAM 2's
                single-mask output if stable, else its best candidate.
            return_logits: mask logits instead of thresholded masks.
            normalize_coords: coordinates are pixels (True) or fractions (False).

        Returns:
            masks (C, H, W) float32 (0/1, or logits with ``return_logits``) at the original
            size, predicted IoU (C,) in [0, 1], low-res logits (C, 256, 256) clamped to
            +-32; C = 3 with ``multimask_output`` else 1; with B prompt sets (B > 1),
            (B, C, H, W), (B, C) and (B, C, 256, 256).
        """
        self._require_image()
        if len(self._orig_hw) > 1:
            raise SeganyError(
                f"{len(self._orig_hw)} images are set; use predict_batch for several images"
            )
        prompts = self._prompts(0, point_coords, point_labels, box, mask_input, normalize_coords)
        return self._numpy_prediction(0, prompts, multimask_output, return_logits)

    def predict_batch(
        self,
        point_coords_batch: Sequence[ArrayLike | None] | None = None,
        point_labels_batch: Sequence[ArrayLike | None] | None = None,
        box_batch: Sequence[ArrayLike | None] | None = None,
        mask_input_batch: Sequence[ArrayLike | None] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> BatchPrediction:
        """Prompts for each image of :meth:`set_image_batch`: one entry per image in each
        list given (None where an image has no such prompt), each as in :meth:`predict`.

        Returns lists of masks, predicted IoU and low-res logits, one per image, each as
        :meth:`predict` returns them.
        """
        self._require_image(how="set_image_batch")
        count = len(self._orig_hw)
        columns = (point_coords_batch, point_labels_batch, box_batch, mask_input_batch)
        for column in columns:
            if column is not None and len(column) != count:
                raise SeganyError(
                    f"{len(column)} prompts given for {count} images; give one per image"
                )
        out: BatchPrediction = ([], [], [])
        for index in range(count):
            coords, labels, box, mask = (None if c is None else c[index] for c in columns)
            prompts = self._prompts(index, coords, labels, box, mask, normalize_coords)
            prediction = self._numpy_prediction(index, prompts, multimask_output, return_logits)
            for collected, value in zip(out, prediction, strict=True):
                collected.append(value)
        return out

    def _numpy_prediction(
        self, index: int, prompts: Prompts, multimask_output: bool, return_logits: bool
    ) -> Prediction:
        """:meth:`_predict` of image ``index`` as NumPy, without the batch axis of one
        prompt set (Meta's ``squeeze(0)``)."""
        masks, iou, low_res = self._predict(
            *prompts, multimask_output, return_logits, img_idx=index
        )
        return (
            to_numpy(masks.float().squeeze(0)),
            to_numpy(iou.squeeze(0)),
            to_numpy(low_res.squeeze(0)),
        )

    def _prompts(
        self,
        index: int,
        point_coords: ArrayLike | None,
        point_labels: ArrayLike | None,
        box: ArrayLike | None,
        mask_input: ArrayLike | None,
        normalize_coords: bool,
    ) -> Prompts:
        """User prompts for image ``index``, checked, as :meth:`_predict` takes them:
        points (B, N, 2) and labels (B, N), boxes (B, 2, 2) as corners, in the model's
        S x S frame; mask logits (1 or B, 1, 256, 256)."""
        size = self._orig_hw[index]
        points, boxes = checked_prompts(point_coords, point_labels, box, size, normalize_coords)
        if points is not None and boxes is not None and len(points[0]) != len(boxes):
            raise SeganyError(
                f"{len(points[0])} point sets but {len(boxes)} boxes; give one set per box"
            )
        sets = None  # prompt sets given by points or boxes; a mask input alone sets B
        if points is not None or boxes is not None:
            sets = len(points[0]) if points is not None else len(boxes)
        coords = labels = corners = None
        if points is not None:
            coords = self._to_model_frame(points[0], size, normalize_coords)
            labels = torch.as_tensor(points[1], dtype=torch.int, device=self.device)
        if boxes is not None:
            corners = self._to_model_frame(boxes.reshape(-1, 2, 2), size, normalize_coords)
        return coords, labels, corners, self._mask_prompt(mask_input, sets)

    def _to_model_frame(
        self, coords: np.ndarray, size: tuple[int, int], normalize: bool
    ) -> torch.Tensor:
        """(..., 2) x, y in pixels of an image of ``size`` (H, W) (fractions 0-1 of its
        width and height when not ``normalize``) -> pixels of the S x S model input. The
        image was squashed to S x S, so each axis scales on its own."""
        points = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
        if normalize:
            height, width = size
            points = points / torch.tensor([width, height], dtype=torch.float32, device=self.device)
        return points * self.model.image_size

    def _mask_prompt(self, mask_input: ArrayLike | None, sets: int | None) -> torch.Tensor | None:
        """(1, 256, 256) or (B, 1, 256, 256) low-res logits -> a (1 or B, 1, 256, 256)
        tensor; B must be the number of prompt ``sets`` when there are points or boxes."""
        if mask_input is None:
            return None
        height, width = self._low_res_size
        mask = as_float_array(mask_input, "mask_input")
        if mask.ndim != 4:
            mask = check_mask_input(mask, (height, width))[None]
        elif mask.shape[1:] != (1, height, width):
            raise SeganyError(
                f"mask_input must have shape (1, {height}, {width}) or (B, 1, {height}, "
                f"{width}) (low-res logits from a previous prediction), got {mask.shape}"
            )
        if sets is not None and len(mask) not in (1, sets):
            raise SeganyError(
                f"{len(mask)} mask inputs for {sets} prompt sets; give one, or one per set"
            )
        return torch.as_tensor(mask, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def _predict(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        img_idx: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for prompts already in the model's S x S frame (Meta's tensor-level call,
        for code written against it).

        Args:
            point_coords: (B, N, 2) points, or None; point_labels: (B, N).
            boxes: (B, 4) or (B, 2, 2) XYXY boxes, or None.
            mask_input: (1 or B, 1, 256, 256) low-res logits, or None.
            img_idx: which image set (negative: from the end; Meta's default is the last).

        Returns:
            masks (B, C, H, W) (bool, or logits with ``return_logits``), predicted IoU
            (B, C) and low-res logits (B, C, 256, 256) clamped to +-32, all float32 but
            the masks.
        """
        index = self._image_index(img_idx)
        low_res, iou = self.inference.decode(
            self._decoder_embedding[index : index + 1],
            _with_box_corners(point_coords, point_labels, boxes),
            None,  # boxes go in as points, never through the prompt encoder's box path
            mask_input,
            multimask_output,
            high_res_features=self._decoder_high_res_of(index),
            image=None if mask_input is not None else self._image_side(index),
        )
        # One resize, from the unclamped logits straight to the original size (the image
        # was squashed, not padded: nothing to crop).
        masks = F.interpolate(low_res, self._orig_hw[index], mode="bilinear", align_corners=False)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low_res.clamp(-LOW_RES_LIMIT, LOW_RES_LIMIT)


def _rgb_pixels(image: np.ndarray | Image.Image, what: str) -> np.ndarray:
    """A NumPy (H, W, 3) uint8 RGB image, or a PIL image, as a checked uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return check_image(image, what=what)


def checked_prompts(
    point_coords: ArrayLike | None,
    point_labels: ArrayLike | None,
    box: ArrayLike | None,
    size: tuple[int, int],
    normalize_coords: bool,
) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray | None]:
    """Clicks and boxes checked against an (H, W) image (pixels), or against the unit
    square when ``normalize_coords`` is False (fractions of the width and height): the
    point sets of :func:`_point_sets` and the (B, 4) XYXY boxes, each None if not given."""
    bounds = size if normalize_coords else (1, 1)
    try:
        return _point_sets(point_coords, point_labels, bounds), check_boxes(box, bounds)
    except SeganyError as error:
        if normalize_coords:
            raise
        raise SeganyError(
            f"{error} (with normalize_coords=False, coordinates are fractions 0-1 of the "
            "width and height)"
        ) from None


def _point_sets(
    point_coords: ArrayLike | None, point_labels: ArrayLike | None, bounds: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """One point set, (N, 2) with (N,) labels, or B sets, (B, N, 2) with (B, N), checked
    (points inside ``bounds`` (H, W); labels 1, 0, or -1 for padding) -> (B, N, 2), (B, N)."""
    if point_coords is None and point_labels is None:
        return None
    if point_coords is None or point_labels is None:
        raise SeganyError("point_coords and point_labels must be given together")
    coords = as_float_array(point_coords, "point_coords")
    labels = as_float_array(point_labels, "point_labels")
    if coords.ndim not in (2, 3) or coords.shape[-1] != 2:
        raise SeganyError(f"point_coords must have shape (N, 2) or (B, N, 2), got {coords.shape}")
    expected = coords.shape[:-1]
    if labels.shape != expected:
        if labels.shape[:-1] == expected[:-1]:
            raise SeganyError(
                f"{expected[-1]} points but {labels.shape[-1]} labels; give one label per point"
            )
        raise SeganyError(
            f"point_labels must have shape {expected} for point_coords of shape "
            f"{coords.shape}, got {labels.shape}"
        )
    if coords.ndim == 2:
        coords, labels = coords[None], labels[None]
    for points, classes in zip(coords, labels, strict=True):
        real = classes != NOT_A_POINT  # padding: no position (the model reads its label)
        check_points(points[real], classes[real], bounds)
    return coords, labels.astype(np.int64)


def _with_box_corners(
    coords: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Points (B, N, 2) with labels (B, N) and boxes (B, 4) or (B, 2, 2) as one point
    prompt, as SAM 2 was trained: each box as its two corners labelled 2 and 3, before
    the points."""
    points = None if coords is None or labels is None else (coords, labels)
    if boxes is None:
        return points
    corners = boxes.reshape(-1, 2, 2)
    corner_labels = torch.tensor([BOX_CORNER_LABELS], dtype=torch.int, device=boxes.device)
    corner_labels = corner_labels.expand(len(corners), -1)
    if points is None:
        return corners, corner_labels
    return (
        torch.cat([corners, points[0]], dim=1),
        torch.cat([corner_labels, points[1].to(torch.int)], dim=1),
    )

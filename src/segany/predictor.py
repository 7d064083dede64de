"""Interactive prediction: embed an image once, then decode prompts in milliseconds.

:class:`SamPredictor` is a drop-in for the official ``segment_anything.SamPredictor``
(same methods, arguments and return shapes) and adds: reusing a saved embedding
(:meth:`SamPredictor.set_image_embedding`), several images embedded in one batch
(:meth:`SamPredictor.set_image_batch` / :meth:`SamPredictor.predict_batch`), and
many prompt sets of different sizes in one call (:meth:`SamPredictor.predict_prompts`).

Conventions: coordinates are pixels of the original image, (x, y); boxes are
XYXY; point label 1 = foreground, 0 = background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import SeganyError
from .inference.mask_decoder import ImageSide
from .inference.model import InferenceModel, uses_high_res
from .inference.postprocess import upscale_logits_fast
from .inference.precision import resolve_precision
from .inputs import (
    ArrayLike,
    as_float_array,
    check_boxes,
    check_image,
    check_mask_input,
    check_points,
)
from .modeling import Sam
from .modeling.prompt_encoder import NOT_A_POINT
from .transforms import ResizeLongestSide

Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]


class SamPredictor:
    """Computes an image embedding once and predicts masks for prompts on it.

    Args:
        sam_model: the model (on the device to run on).
        precision: ``auto`` (default), ``fp32``, ``bf16`` or ``fp16``; see
            :mod:`segany.inference.precision`. ``fp32`` gives the official code's numbers.
        compile: run the image encoder through ``torch.compile`` (slow first call; falls
            back to eager mode with a warning where compilation fails).
    """

    def __init__(self, sam_model: Sam, precision: str = "auto", compile: bool = False) -> None:
        self.model = sam_model
        self.precision = resolve_precision(precision, sam_model.device, sam_model)
        # What makes inference fast, made from the weights (again when they change).
        self.inference = InferenceModel(sam_model, self.precision, compile)
        self.transform = ResizeLongestSide(sam_model.image_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def features(self) -> torch.Tensor | None:
        """(N, C, h, w) embeddings of the image(s) set, or None."""
        return self._features

    @features.setter
    def features(self, features: torch.Tensor | None) -> None:
        # Assigned directly too (as with the official predictor): the decoder's copy and
        # the prepared image sides must follow.
        self._features = features
        self._decoder_features = (
            None if features is None else self.inference.decoder_input(features)
        )
        self._image_sides: dict[int, ImageSide | None] = {}

    @property
    def high_res_features(self) -> list[torch.Tensor] | None:
        """For a decoder with high-resolution features (see :func:`uses_high_res`), the
        image(s)' projected 1/4 and 1/8 features ((N, C/8, S/4, S/4), (N, C/4, S/8, S/8)),
        else None."""
        return self._high_res

    @high_res_features.setter
    def high_res_features(self, features: list[torch.Tensor] | None) -> None:
        self._high_res = features
        self._decoder_high_res = (
            None if features is None else [self.inference.decoder_input(f) for f in features]
        )
        self._image_sides = {}

    @property
    def _low_res_size(self) -> tuple[int, int]:
        h, w = self.model.prompt_encoder.mask_input_size
        return int(h), int(w)

    def reset_image(self) -> None:
        """Forget the current image(s), their embedding and what was prepared from it."""
        self.is_image_set = False
        self.features = None
        self.high_res_features = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._original_sizes: list[tuple[int, int]] = []
        self._input_sizes: list[tuple[int, int]] = []
        self.orig_h = self.orig_w = self.input_h = self.input_w = None

    # -- images ---------------------------------------------------------------

    def _prepare(self, image: np.ndarray, image_format: str) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, h, w) float tensor in the resized frame, RGB."""
        image = check_image(image, image_format, self.model.image_format)
        resized = self.transform.apply_image(image)
        return torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an (H, W, 3) uint8 image in ``image_format`` ('RGB' or 'BGR')."""
        self.set_torch_image(self._prepare(image, image_format), image.shape[:2])

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Embed a (1, 3, h, w) image already resized so that max(h, w) = image size."""
        size = self.model.image_size
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[1] != 3 or max(shape[2:]) != size:
            raise SeganyError(
                f"set_torch_image input must be BCHW with long side {size}, got {shape}"
            )
        self.reset_image()
        self.inference.refresh()
        embedding, high_res = self.inference.encode(self.model.preprocess(transformed_image))
        features = embedding if high_res is None else (embedding, high_res)
        self._store(features, [tuple(original_image_size)] * shape[0], [shape[2:]] * shape[0])

    def set_image_batch(
        self, images: Sequence[np.ndarray], image_format: str = "RGB", batch_size: int = 4
    ) -> None:
        """Embed several images, ``batch_size`` at a time; then use :meth:`predict_batch`."""
        if len(images) == 0:
            raise SeganyError("set_image_batch needs at least one image")
        prepared = [self._prepare(image, image_format) for image in images]
        self.reset_image()
        self.inference.refresh()
        chunks = []
        with torch.no_grad():
            for start in range(0, len(prepared), batch_size):
                batch = torch.cat(
                    [self.model.preprocess(x) for x in prepared[start : start + batch_size]]
                )
                chunks.append(self.inference.encode(batch))
        embeddings, high_res = zip(*chunks, strict=True)
        features: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]] = torch.cat(embeddings)
        if high_res[0] is not None:  # (embedding, high-resolution features) per chunk
            features = (features, [torch.cat(f) for f in zip(*high_res, strict=True)])
        self._store(
            features,
            [tuple(image.shape[:2]) for image in images],
            [tuple(x.shape[-2:]) for x in prepared],
        )

    def set_image_embedding(
        self,
        embedding: torch.Tensor | np.ndarray,
        original_size: tuple[int, int],
        high_res_features: Sequence[torch.Tensor | np.ndarray] | None = None,
    ) -> None:
        """Reuse an embedding from :meth:`get_image_embedding`.

        ``original_size`` is the (H, W) of the image it was computed from. A model whose
        decoder takes high-resolution features also needs those
        (:attr:`high_res_features` of the predictor that made the embedding).
        """
        features = torch.as_tensor(embedding)
        if features.ndim == 3:
            features = features[None]
        grid = self.model.prompt_encoder.image_embedding_size
        expected = (1, self.model.prompt_encoder.embed_dim, *grid)
        if tuple(features.shape) != expected:
            raise SeganyError(
                f"embedding has shape {tuple(features.shape)} but this model expects {expected}"
            )
        height, width = (int(v) for v in original_size)
        if height <= 0 or width <= 0:
            raise SeganyError(f"original_size must be positive (H, W), got {original_size}")
        high_res = self._checked_high_res(high_res_features)
        self.reset_image()
        self.inference.refresh()
        input_size = self.transform.get_preprocess_shape(height, width, self.model.image_size)
        stored = (
            features.to(self.device) if high_res is None else (features.to(self.device), high_res)
        )
        self._store(stored, [(height, width)], [input_size])

    def _checked_high_res(
        self, features: Sequence[torch.Tensor | np.ndarray] | None
    ) -> list[torch.Tensor] | None:
        """High-resolution features given with an embedding, checked against the model."""
        if not uses_high_res(self.model):
            if features is not None:
                raise SeganyError("this model's decoder takes no high-resolution features")
            return None
        if features is None:
            raise SeganyError(
                "this model's decoder also needs the image's high-resolution features: "
                "pass high_res_features (the embedding predictor's high_res_features)"
            )
        grid = self.model.prompt_encoder.image_embedding_size
        dim = self.model.prompt_encoder.embed_dim
        expected = [
            (1, dim // 8, 4 * grid[0], 4 * grid[1]),
            (1, dim // 4, 2 * grid[0], 2 * grid[1]),
        ]
        tensors = [torch.as_tensor(f) for f in features]
        tensors = [t[None] if t.ndim == 3 else t for t in tensors]
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != expected:
            raise SeganyError(
                f"high_res_features have shapes {shapes} but this model expects {expected}"
            )
        return [t.float().to(self.device) for t in tensors]

    def _store(
        self,
        features: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]],
        original_sizes: list[tuple[int, ...]],
        input_sizes: list[tuple[int, ...]],
    ) -> None:
        """Keep an embedding (or an (embedding, high-resolution features) pair)."""
        if isinstance(features, torch.Tensor):
            self.features = features
        else:
            self.features, self.high_res_features = features
        self._original_sizes = [(int(h), int(w)) for h, w in original_sizes]
        self._input_sizes = [(int(h), int(w)) for h, w in input_sizes]
        self.original_size = self._original_sizes[0]
        self.input_size = self._input_sizes[0]
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        self.is_image_set = True

    def _require_image(self, what: str = "mask prediction") -> None:
        if not self.is_image_set:
            raise RuntimeError(f"An image must be set with .set_image(...) before {what}.")

    def _require_single_image(self) -> None:
        self._require_image()
        if len(self._original_sizes) > 1:
            raise SeganyError(
                f"{len(self._original_sizes)} images are set; use predict_batch for several images"
            )

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, C, h, w) embedding of the current image ((N, C, h, w) after a batch)."""
        self._require_image("getting the embedding")
        assert self.features is not None
        return self.features

    def decoder_features(self, image_index: int = 0) -> torch.Tensor:
        """The (1, C, h, w) embedding of image ``image_index`` as the mask decoder takes it
        (see :meth:`Precision.decoder_input`), kept from when the image was set."""
        self._require_image()
        assert self._decoder_features is not None
        return self._decoder_features[image_index : image_index + 1]

    def _decoder_high_res_of(self, image_index: int) -> list[torch.Tensor] | None:
        """Image ``image_index``'s high-resolution features as the decoder reads them."""
        if self._decoder_high_res is None:
            return None
        return [f[image_index : image_index + 1] for f in self._decoder_high_res]

    def _image_side(self, image_index: int) -> ImageSide | None:
        """Image ``image_index`` prepared for decoding (on its first decode, until
        :meth:`reset_image` or a weight change)."""
        side = self._image_sides.get(image_index)
        if not self.inference.is_current(side):
            side = self.inference.prepare_image(
                self.decoder_features(image_index), self._decoder_high_res_of(image_index)
            )
            self._image_sides[image_index] = side
        return side

    # -- prompts --------------------------------------------------------------

    def predict(
        self,
        point_coords: ArrayLike | None = None,
        point_labels: ArrayLike | None = None,
        box: ArrayLike | None = None,
        mask_input: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for one prompt set on the current image.

        Args:
            point_coords: (N, 2) pixel (x, y) of the original image.
            point_labels: (N,) 1 foreground / 0 background.
            box: (4,) XYXY box in pixels.
            mask_input: (1, 256, 256) low-res logits from a previous call.
            multimask_output: three candidate masks instead of one.
            return_logits: return logits instead of thresholded masks.

        Returns:
            masks (C, H, W) bool (float logits with ``return_logits``), scores (C,),
            low-res logits (C, 256, 256); C = 3 with ``multimask_output`` else 1.
        """
        self._require_single_image()
        assert self.original_size is not None
        points = check_points(point_coords, point_labels, self.original_size)
        boxes = check_boxes(box, self.original_size)
        if boxes is not None and len(boxes) != 1:
            raise SeganyError(f"predict takes one box, got {len(boxes)}; use predict_prompts")
        mask = check_mask_input(mask_input, self._low_res_size)
        coords_t, labels_t = None, None
        if points is not None:
            coords_t = self._to_model_frame(points[0], self.original_size)[None]
            labels_t = torch.as_tensor(points[1], dtype=torch.int, device=self.device)[None]
        masks, scores, low_res = self.predict_torch(
            coords_t,
            labels_t,
            None if boxes is None else self._boxes_to_model_frame(boxes, self.original_size),
            None
            if mask is None
            else torch.as_tensor(mask, dtype=torch.float, device=self.device)[None],
            multimask_output,
            return_logits=return_logits,
        )
        return to_numpy(masks[0]), to_numpy(scores[0]), to_numpy(low_res[0])

    def predict_prompts(
        self,
        point_coords: Sequence[ArrayLike] | None = None,
        point_labels: Sequence[ArrayLike] | None = None,
        boxes: ArrayLike | None = None,
        mask_inputs: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
    ) -> Prediction:
        """Masks for B prompt sets at once on one image.

        Args:
            point_coords: B arrays of (Ni, 2) pixel coordinates; sets may differ in
                size and are padded with "not a point" tokens (label -1), the
                official convention, so results can differ slightly from B
                separate calls with sets of different sizes.
            point_labels: B arrays of (Ni,) labels.
            boxes: (B, 4) XYXY boxes.
            mask_inputs: (B, 1, 256, 256) low-res logits.
            image_index: which image of a :meth:`set_image_batch` call.

        Returns:
            masks (B, C, H, W), scores (B, C), low-res logits (B, C, 256, 256).
        """
        self._require_image()
        if not 0 <= image_index < len(self._original_sizes):
            raise SeganyError(
                f"image_index {image_index} out of range (0..{len(self._original_sizes) - 1})"
            )
        size = self._original_sizes[image_index]
        coords_t, labels_t = self._padded_points(point_coords, point_labels, size)
        box_array = check_boxes(boxes, size)
        counts = {len(x) for x in (point_coords, box_array, mask_inputs) if x is not None}
        if len(counts) > 1:
            raise SeganyError(f"prompt sets disagree in number: {sorted(counts)}; give one per set")
        masks_t = None
        if mask_inputs is not None:
            masks_np = as_float_array(mask_inputs, "mask_inputs")
            if masks_np.ndim != 4 or masks_np.shape[1:] != (1, *self._low_res_size):
                raise SeganyError(
                    f"mask_inputs must have shape (B, 1, 256, 256), got {masks_np.shape}"
                )
            masks_t = torch.as_tensor(masks_np, dtype=torch.float, device=self.device)
        masks, scores, low_res = self._decode(
            image_index,
            coords_t,
            labels_t,
            None if box_array is None else self._boxes_to_model_frame(box_array, size),
            masks_t,
            multimask_output,
            return_logits,
        )
        return to_numpy(masks), to_numpy(scores), to_numpy(low_res)

    def predict_batch(
        self,
        point_coords_batch: Sequence[ArrayLike | None] | None = None,
        point_labels_batch: Sequence[ArrayLike | None] | None = None,
        box_batch: Sequence[ArrayLike | None] | None = None,
        mask_input_batch: Sequence[ArrayLike | None] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """One prompt set per image of :meth:`set_image_batch`.

        Each entry follows :meth:`predict` (points (N, 2), labels (N,), box (4,),
        mask (1, 256, 256)); None where an image has no such prompt. Returns
        lists of masks, scores and low-res logits, one per image.
        """
        self._require_image()
        count = len(self._original_sizes)
        columns = [point_coords_batch, point_labels_batch, box_batch, mask_input_batch]
        for column in columns:
            if column is not None and len(column) != count:
                raise SeganyError(f"{len(column)} prompts given for {count} images")
        out: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
        for index in range(count):
            coords, labels, box, mask = (None if c is None else c[index] for c in columns)
            size = self._original_sizes[index]
            points = check_points(coords, labels, size)
            boxes = check_boxes(box, size)
            mask_np = check_mask_input(mask, self._low_res_size)
            result = self._decode(
                index,
                None if points is None else self._to_model_frame(points[0], size)[None],
                None if points is None else torch.as_tensor(points[1], device=self.device)[None],
                None if boxes is None else self._boxes_to_model_frame(boxes[:1], size),
                None
                if mask_np is None
                else torch.as_tensor(mask_np, dtype=torch.float, device=self.device)[None],
                multimask_output,
                return_logits,
            )
            for collected, value in zip(out, result):
                collected.append(to_numpy(value[0]))
        return out

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction on tensors already in the model's input frame.

        Args:
            point_coords: (B, N, 2) coordinates transformed with ``self.transform``.
            point_labels: (B, N) labels; -1 marks padding.
            boxes: (B, 4) transformed XYXY boxes.
            mask_input: (B, 1, 256, 256) low-res logits.

        Returns:
            masks (B, C, H, W), scores (B, C), low-res logits (B, C, 256, 256).
        """
        self._require_single_image()
        if (point_coords is None) != (point_labels is None):
            raise SeganyError("point_coords and point_labels must be given together")
        return self._decode(
            0, point_coords, point_labels, boxes, mask_input, multimask_output, return_logits
        )

    def _decode(
        self,
        image_index: int,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        return_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        points = None if point_coords is None else (point_coords, point_labels)
        low_res, scores = self.decode_low_res(
            image_index, points, boxes, mask_input, multimask_output
        )
        with torch.no_grad():
            masks = upscale_logits_fast(
                low_res,
                self.model.image_size,
                self._input_sizes[image_index],
                self._original_sizes[image_index],
            )
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, scores, low_res

    def decode_low_res(
        self,
        image_index: int,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        min_iou: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, 3 or 1, 4h, 4w) and predicted IoU (B, 3 or 1), float32,
        for prompts in the model frame (points (B, N, 2) with labels (B, N), boxes (B, 4),
        mask logits (B, 1, 4h, 4w)) against image ``image_index``. ``min_iou``: leave the
        masks of prompt sets with no mask above it empty (-inf), for callers that drop
        them anyway (see :meth:`FastMaskDecoder.decode_image`)."""
        return self.inference.decode(
            self.decoder_features(image_index),
            points,
            boxes,
            mask_input,
            multimask_output,
            high_res_features=self._decoder_high_res_of(image_index),
            image=None if mask_input is not None else self._image_side(image_index),
            min_iou=min_iou,
        )

    # -- coordinate helpers ----------------------------------------------------

    def _to_model_frame(self, coords: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        scaled = self.transform.apply_coords(coords, size)
        return torch.as_tensor(scaled, dtype=torch.float, device=self.device)

    def _boxes_to_model_frame(self, boxes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        scaled = self.transform.apply_boxes(boxes, size)
        return torch.as_tensor(scaled, dtype=torch.float, device=self.device)

    def _padded_points(
        self,
        point_coords: Sequence[ArrayLike] | None,
        point_labels: Sequence[ArrayLike] | None,
        size: tuple[int, int],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """B point sets of different sizes -> (B, N, 2) coords and (B, N) labels, padded with -1."""
        if point_coords is None and point_labels is None:
            return None, None
        if point_coords is None or point_labels is None:
            raise SeganyError("point_coords and point_labels must be given together")
        if len(point_coords) != len(point_labels):
            raise SeganyError(f"{len(point_coords)} point sets but {len(point_labels)} label sets")
        checked = [check_points(c, lab, size) for c, lab in zip(point_coords, point_labels)]
        longest = max((len(c) for c, _ in checked), default=0)
        coords = np.zeros((len(checked), longest, 2))
        labels = np.full((len(checked), longest), NOT_A_POINT, dtype=np.int64)
        for row, (c, lab) in enumerate(checked):
            coords[row, : len(c)] = c
            labels[row, : len(lab)] = lab
        return (
            self._to_model_frame(coords, size),
            torch.as_tensor(labels, dtype=torch.int, device=self.device),
        )


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a NumPy array on the CPU, floating point as float32 (the predictors'
    outputs are float32 whatever the precision)."""
    return (
        tensor.detach().float().cpu().numpy()
        if tensor.is_floating_point()
        else tensor.cpu().numpy()
    )

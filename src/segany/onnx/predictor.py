"""Interactive prediction with ONNX Runtime: no PyTorch needed (``pip install segany[onnx]``).

:class:`OnnxSamPredictor` runs a folder written by ``segany export`` with the same
methods, arguments and return shapes as :class:`segany.SamPredictor`, and gives the
same masks. For a SAM 2 export (``family`` "sam2" in ``model.json``) it gives what
:class:`segany.Sam2ImagePredictor` (and Meta's ``SAM2ImagePredictor``) gives: the image
squashed to the model's square (:func:`resize_square`), box corners before the clicks,
SAM 2's single-mask choice, masks as float32 0/1 (see :meth:`OnnxSamPredictor.predict`).

Conventions: coordinates are pixels of the original image, (x, y); boxes are
XYXY; point label 1 = foreground, 0 = background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SeganyError
from ..inputs import ArrayLike, check_boxes, check_image, check_mask_input, check_points
from ..resize import ResizeLongestSide
from .format import (
    BOX_CORNER_LABELS,
    DECODER_FILE,
    ENCODER_FILE,
    ENCODER_INPUT,
    HIGH_RES_FEATURES,
    PADDING_LABEL,
    RESIZE_SQUARE,
    SAM2,
    ModelInfo,
)

Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "OnnxSamPredictor needs ONNX Runtime: pip install 'segany[onnx]'"
        ) from None
    return onnxruntime


class OnnxSamPredictor:
    """Embeds an image with ``encoder.onnx`` once and decodes prompts with ``decoder.onnx``.

    Args:
        model_dir: a folder written by ``segany export`` (default decoder options: all
            four mask outputs and predicted IoU, which this class needs).
        providers: ONNX Runtime execution providers (default: CPU).
        session_options: ``onnxruntime.SessionOptions``, e.g. to set thread counts.
    """

    def __init__(
        self,
        model_dir: str | Path,
        providers: list[str] | None = None,
        session_options: Any = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.info = ModelInfo.load(self.model_dir)
        options = self.info.decoder
        if options.return_single_mask or options.use_stability_score:
            raise SeganyError(
                f"{self.model_dir / DECODER_FILE} was exported with --return-single-mask or "
                "--use-stability-score; OnnxSamPredictor needs all mask outputs and predicted "
                "IoU: export again without them"
            )
        self.encoder = self._session(ENCODER_FILE, providers, session_options)
        self.decoder = self._session(DECODER_FILE, providers, session_options)
        self._decoder_outputs = [output.name for output in self.decoder.get_outputs()]
        self.transform = ResizeLongestSide(self.info.img_size)
        self.mask_threshold = self.info.mask_threshold
        self.reset_image()

    @property
    def is_sam2(self) -> bool:
        """Whether the folder holds a SAM 2 model (SAM 2's prompt and mask conventions)."""
        return self.info.family == SAM2

    def _session(self, name: str, providers: list[str] | None, options: Any) -> Any:
        path = self.model_dir / name
        if not path.is_file():
            raise SeganyError(f"{path} not found; export the model again with `segany export`")
        onnxruntime = _onnxruntime()
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: np.ndarray | None = None
        # The encoder's high-resolution outputs, for a model whose decoder takes them.
        self.high_res_features: list[np.ndarray] | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    # -- images ---------------------------------------------------------------

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an (H, W, 3) uint8 image in ``image_format`` ('RGB' or 'BGR')."""
        image = check_image(image, image_format, self.info.image_format)
        pixels = self.encoder_input(image)
        features, *high_res = self.encoder.run(None, {ENCODER_INPUT: pixels})
        size = (image.shape[0], image.shape[1])
        self._store(features, size, pixels.shape[2:], high_res or None)

    def encoder_input(self, image: np.ndarray) -> np.ndarray:
        """A checked (H, W, 3) uint8 image in the model's channel order -> the encoder's
        ``image`` input, as ``model.json`` says: for SAM (1, 3, h, w) pixel values 0-255
        resized so that max(h, w) = img_size; for SAM 2 the (1, 3, S, S) model input,
        squashed (:func:`resize_square`) and normalised."""
        info = self.info
        if info.resize == RESIZE_SQUARE:
            # Scaled before the resize, in float32, as Sam2.preprocess does.
            pixels = image.astype(np.float32) / np.float32(info.pixel_scale)
            resized = resize_square(pixels, info.img_size)
        else:
            resized = self.transform.apply_image(image).astype(np.float32)
        pixels = resized.transpose(2, 0, 1)[None]  # (1, 3, h, w)
        if info.normalized_input:
            mean = np.asarray(info.pixel_mean, dtype=np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(info.pixel_std, dtype=np.float32).reshape(1, 3, 1, 1)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def set_image_embedding(
        self,
        embedding: np.ndarray,
        original_size: tuple[int, int],
        high_res_features: list[np.ndarray] | None = None,
    ) -> None:
        """Reuse an embedding from :meth:`get_image_embedding` (or the PyTorch predictor's).

        ``original_size`` is the (H, W) of the image it was computed from. A model whose
        decoder takes high-resolution features also needs those (``high_res_features``
        of the predictor that made the embedding; for SAM 2, ``_features["image_embed"]``
        and ``_features["high_res_feats"]`` of :class:`segany.Sam2ImagePredictor` or
        Meta's predictor: (1, C, g, g), then (1, C/8, 4g, 4g) and (1, C/4, 2g, 2g)).
        """
        features = np.asarray(embedding, dtype=np.float32)
        if features.ndim == 3:
            features = features[None]
        expected = tuple(self.info.embedding_shape)
        if features.shape != expected:
            raise SeganyError(
                f"embedding has shape {features.shape} but this model expects {expected}"
            )
        height, width = (int(v) for v in original_size)
        if height <= 0 or width <= 0:
            raise SeganyError(f"original_size must be positive (H, W), got {original_size}")
        if self.info.high_res_features != (high_res_features is not None):
            raise SeganyError(
                "this model's decoder needs the image's high_res_features too"
                if self.info.high_res_features
                else "this model's decoder takes no high_res_features"
            )
        high_res = None
        if high_res_features is not None:
            high_res = [np.asarray(f, dtype=np.float32) for f in high_res_features]
            high_res = [f[None] if f.ndim == 3 else f for f in high_res]
        size = (
            (self.info.img_size, self.info.img_size)
            if self.info.resize == RESIZE_SQUARE
            else self.transform.get_preprocess_shape(height, width, self.info.img_size)
        )
        self._store(features, (height, width), size, high_res)

    def _store(
        self,
        features: np.ndarray,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
        high_res: list[np.ndarray] | None = None,
    ) -> None:
        self.features = features
        self.high_res_features = high_res
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """The (1, C, g, g) embedding of the current image."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before getting it.")
        assert self.features is not None
        return self.features

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
            mask_input: (1, 4g, 4g) low-res logits from a previous call (1, 256, 256 for SAM).
            multimask_output: three candidate masks instead of one. For SAM 2, one mask is
                the single-mask output if stable, else the best of the three.
            return_logits: return logits instead of thresholded masks.

        Returns:
            masks (C, H, W) at the original size: bool (SAM) or float32 0/1 (SAM 2, as
            :class:`segany.Sam2ImagePredictor` and Meta's return them), or float32 logits
            with ``return_logits``; scores (C,) (SAM 2: in [0, 1]); low-res logits
            (C, 4g, 4g) (SAM 2: clamped to +-32); C = 3 with ``multimask_output`` else 1.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        assert self.original_size is not None
        points = check_points(point_coords, point_labels, self.original_size)
        boxes = check_boxes(box, self.original_size)
        if boxes is not None and len(boxes) != 1:
            raise SeganyError(f"predict takes one box, got {len(boxes)}")
        mask = check_mask_input(mask_input, self.info.mask_input_size)
        prompt = self._sam2_points(points, boxes) if self.is_sam2 else None
        outputs = self.run_decoder(*(prompt or self._official_points(points, boxes)), mask)
        scores, low_res = outputs["iou_predictions"][0], outputs["low_res_masks"][0]
        # Token 0 is the single-mask output, tokens 1-3 the multimask ones.
        if multimask_output:
            chosen = slice(1, None)
        else:
            single = self._single_mask_token(low_res, scores)
            chosen = slice(single, single + 1)
        masks = outputs["masks"][0, chosen]
        if not return_logits:
            masks = masks > self.mask_threshold
            if self.is_sam2:
                masks = masks.astype(np.float32)
        return masks, scores[chosen], low_res[chosen]

    def _single_mask_token(self, low_res: np.ndarray, scores: np.ndarray) -> int:
        """Which of the four outputs is the one mask: token 0, or for SAM 2 (a recorded
        ``dynamic_multimask_stability``) token 0 if its low-res logits are stable, else the
        multimask output of highest predicted IoU, as SAM 2's decoder chooses."""
        choice = self.info.dynamic_multimask_stability
        if choice is None:
            return 0
        delta, threshold = choice
        inner = np.count_nonzero(low_res[0] > delta)
        outer = np.count_nonzero(low_res[0] > -delta)
        # float32 division, as the model computes it, so that a ratio at the threshold
        # decides alike.
        stability = np.float32(inner) / np.float32(outer) if outer > 0 else np.float32(1.0)
        if stability >= np.float32(threshold):
            return 0
        return 1 + int(np.argmax(scores[1:]))

    def _official_points(
        self, points: tuple[np.ndarray, np.ndarray] | None, boxes: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points and box as the official ONNX inputs: (1, N, 2) coords in the resized frame,
        (1, N) labels, box corners labelled 2 and 3, one padding point when there is no box
        (as SAM's prompt encoder adds), nothing at all when there is no point or box."""
        assert self.original_size is not None
        coords = [np.zeros((0, 2))]
        labels = [np.zeros(0)]
        if points is not None:
            coords.append(self.transform.apply_coords(points[0], self.original_size))
            labels.append(points[1])
            if boxes is None:
                coords.append(np.zeros((1, 2)))
                labels.append(np.array([PADDING_LABEL]))
        if boxes is not None:
            coords.append(self.transform.apply_boxes(boxes, self.original_size).reshape(2, 2))
            labels.append(np.array(BOX_CORNER_LABELS))
        return (
            np.concatenate(coords)[None].astype(np.float32),
            np.concatenate(labels)[None].astype(np.float32),
        )

    def _sam2_points(
        self, points: tuple[np.ndarray, np.ndarray] | None, boxes: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points and box as SAM 2's predictor gives them to its prompt encoder: (1, N, 2)
        coords in the S x S square's pixels (each axis scaled on its own: the image was
        squashed), (1, N) labels; the box corners (labels 2, 3) first, then the clicks,
        then one padding point (SAM 2 never passes boxes, so the prompt encoder always
        pads); nothing at all when there is no point or box."""
        assert self.original_size is not None
        height, width = self.original_size
        scale = np.array([width, height], dtype=np.float32)
        coords = [np.zeros((0, 2), dtype=np.float32)]
        labels = [np.zeros(0, dtype=np.float32)]
        if boxes is not None:
            coords.append(boxes.reshape(2, 2).astype(np.float32))
            labels.append(np.array(BOX_CORNER_LABELS, dtype=np.float32))
        if points is not None:
            coords.append(points[0].astype(np.float32))
            labels.append(points[1].astype(np.float32))
        if len(coords) > 1:
            coords.append(np.zeros((1, 2), dtype=np.float32))
            labels.append(np.array([PADDING_LABEL], dtype=np.float32))
        # As Sam2ImagePredictor computes it in float32: x / W * S.
        model_frame = np.concatenate(coords) / scale * np.float32(self.info.img_size)
        return model_frame[None].astype(np.float32), np.concatenate(labels)[None]

    def run_decoder(
        self, point_coords: np.ndarray, point_labels: np.ndarray, mask_input: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """Run decoder.onnx on official-format inputs for the current image.

        Args:
            point_coords: (1, N, 2) float32 in the resized frame.
            point_labels: (1, N) float32 official labels (see :mod:`segany.onnx.format`).
            mask_input: (1, 4g, 4g) low-res logits, or None.

        Returns:
            The decoder's outputs by name: ``masks`` (1, 4, H, W) logits,
            ``iou_predictions`` (1, 4), ``low_res_masks`` (1, 4, 4g, 4g), ...
        """
        assert self.features is not None and self.original_size is not None
        low_res_size = self.info.mask_input_size
        feeds = {
            "image_embeddings": self.features,
            **dict(zip(HIGH_RES_FEATURES, self.high_res_features or [], strict=False)),
            "point_coords": point_coords,
            "point_labels": point_labels,
            "mask_input": np.zeros((1, 1, *low_res_size), dtype=np.float32)
            if mask_input is None
            else mask_input.astype(np.float32).reshape(1, 1, *low_res_size),
            "has_mask_input": np.array([0.0 if mask_input is None else 1.0], dtype=np.float32),
            "orig_im_size": np.array(self.original_size, dtype=np.float32),
        }
        return dict(zip(self._decoder_outputs, self.decoder.run(None, feeds), strict=True))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) float32 -> (size, size, 3) float32, squashed whatever the aspect ratio.

    Bilinear with ``align_corners=False`` and antialiasing, the filter of PyTorch's
    ``F.interpolate(..., mode="bilinear", antialias=True)`` (Pillow's): output pixel i
    of an axis shrunk by a factor s >= 1 averages the inputs within s of its centre
    (i + 0.5) * s with triangle weights; for s < 1 it is plain bilinear interpolation.
    Width first, then height, each accumulated in float32 in PyTorch's order with its
    fused multiply-adds, so that SAM 2's model input is reproduced to float rounding:
    bit for bit at 600 x 1200, 480 x 360 and 37 x 500 to 1024, within 2e-7 at 3000 x 2000.
    """
    resized = _resize_axis(image.astype(np.float32, copy=False), size, axis=1)
    return _resize_axis(resized, size, axis=0)


def _resize_axis(values: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """``values`` resized along ``axis`` to ``out_size`` (see :func:`resize_square`)."""
    in_size = values.shape[axis]
    if in_size == out_size:
        return values
    starts, weights = _antialias_weights(in_size, out_size)
    moved = np.moveaxis(values, axis, 0)
    out = np.zeros((out_size, *moved.shape[1:]), dtype=np.float32)
    shape = (out_size,) + (1,) * (moved.ndim - 1)
    # One tap at a time, over all output pixels: the order PyTorch sums them in. PyTorch's
    # kernel fuses each multiply-add (one rounding): the product of two float32 values is
    # exact in float64, so adding it there and rounding once gives the same float32 sums
    # (bit for bit on most images measured, else 1-2 ulp apart, as with separate roundings).
    for tap in range(weights.shape[1]):
        index = np.minimum(starts + tap, in_size - 1)
        product = moved[index].astype(np.float64) * weights[:, tap].reshape(shape)
        out = (out + product).astype(np.float32)
    return np.moveaxis(out, 0, axis)


def _antialias_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First input index (out_size,) and normalised float32 weights (out_size, taps) of
    each output pixel; a tap past an output's window has weight 0. Computed as PyTorch's
    ``_compute_indices_min_size_weights_aa`` does, float32 where it stores float32 and
    float64 where C++ promotes to double (adding the literal 0.5), so that the windows and
    weights are the same numbers."""
    scale = np.float32(in_size) / np.float32(out_size)
    support = scale if scale >= 1.0 else np.float32(1.0)  # bilinear: half-width 1, scaled
    inverse = np.float32(1.0 / np.float64(scale)) if scale >= 1.0 else np.float32(1.0)
    taps = int(np.ceil(support)) * 2 + 1
    centres = (np.float64(scale) * (np.arange(out_size) + 0.5)).astype(np.float32)
    starts = np.maximum(((centres - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    ends = np.minimum(((centres + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    counts = np.clip(ends - starts, 0, taps)
    offsets = np.arange(taps)
    positions = (offsets[None, :] + starts[:, None]).astype(np.float32) - centres[:, None]
    distance = ((positions.astype(np.float64) + 0.5) * np.float64(inverse)).astype(np.float32)
    weights = np.maximum(np.float32(0.0), np.float32(1.0) - np.abs(distance))
    weights[offsets[None, :] >= counts[:, None]] = 0.0
    totals = np.zeros(out_size, dtype=np.float32)
    for tap in range(taps):  # summed in order, in float32, as PyTorch does
        totals += weights[:, tap]
    return starts, (weights / np.where(totals == 0, 1, totals)[:, None]).astype(np.float32)

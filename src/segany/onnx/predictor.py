"""Interactive prediction with ONNX Runtime: no PyTorch needed (``pip install segany[onnx]``).

:class:`OnnxSamPredictor` runs a folder written by ``segany export`` with the same
methods, arguments and return shapes as :class:`segany.SamPredictor`, and gives the
same masks.

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
        resized = self.transform.apply_image(image)
        pixels = resized.transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, h, w), 0-255
        features, *high_res = self.encoder.run(None, {ENCODER_INPUT: pixels})
        size = (image.shape[0], image.shape[1])
        self._store(features, size, resized.shape[:2], high_res or None)

    def set_image_embedding(
        self,
        embedding: np.ndarray,
        original_size: tuple[int, int],
        high_res_features: list[np.ndarray] | None = None,
    ) -> None:
        """Reuse an embedding from :meth:`get_image_embedding` (or the PyTorch predictor's).

        ``original_size`` is the (H, W) of the image it was computed from. A model whose
        decoder takes high-resolution features also needs those (``high_res_features``
        of the predictor that made the embedding).
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
        size = self.transform.get_preprocess_shape(height, width, self.info.img_size)
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
            multimask_output: three candidate masks instead of one.
            return_logits: return logits instead of thresholded masks.

        Returns:
            masks (C, H, W) bool (float32 logits with ``return_logits``), scores (C,),
            low-res logits (C, 4g, 4g); C = 3 with ``multimask_output`` else 1.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        assert self.original_size is not None
        points = check_points(point_coords, point_labels, self.original_size)
        boxes = check_boxes(box, self.original_size)
        if boxes is not None and len(boxes) != 1:
            raise SeganyError(f"predict takes one box, got {len(boxes)}")
        mask = check_mask_input(mask_input, self.info.mask_input_size)
        outputs = self.run_decoder(*self._official_points(points, boxes), mask)
        # Token 0 is the single-mask output, tokens 1-3 the multimask ones.
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        masks = outputs["masks"][0, chosen]
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, outputs["iou_predictions"][0, chosen], outputs["low_res_masks"][0, chosen]

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

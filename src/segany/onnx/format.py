"""What ``segany export`` writes and the ONNX Runtime predictor reads (no PyTorch needed).

An export folder holds:

* ``encoder.onnx``: input ``image`` (1, 3, h, w) float32, RGB pixel values 0-255 of
  the image resized so that max(h, w) = ``img_size`` (Pillow bilinear on uint8, see
  :class:`segany.resize.ResizeLongestSide`); h and w are dynamic. Normalisation by
  ``pixel_mean``/``pixel_std`` and zero padding bottom/right to ``img_size`` happen
  in the graph. Output ``image_embeddings`` (1, C, g, g), g = ``img_size`` / 16; for a
  model whose decoder takes high-resolution features (``high_res_features`` in
  ``model.json``: SAM 2's decoders, segany's ``default``) also :data:`HIGH_RES_FEATURES`.
* ``decoder.onnx``: the official SAM ONNX decoder interface (``SamOnnxModel`` of
  ``segment-anything``), see :func:`decoder_inputs` and :func:`decoder_outputs`; with
  high-resolution features, those come right after ``image_embeddings`` (the layout of
  the community SAM 2 exports).
* ``model.json``: :class:`ModelInfo`, what a runtime needs besides the graphs.

Graphs bigger than 2 GB (ViT-H/L encoders in float32) keep their weights in
``encoder.onnx.data`` beside the graph; ONNX Runtime finds it by itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import SeganyError

FORMAT_NAME = "segany-onnx"
FORMAT_VERSION = 1
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
METADATA_FILE = "model.json"

ENCODER_INPUT = "image"
ENCODER_OUTPUT = "image_embeddings"
# The projected 1/4 and 1/8 features, (1, C/8, 4g, 4g) and (1, C/4, 2g, 2g).
HIGH_RES_FEATURES = ("high_res_feats_0", "high_res_feats_1")
# Names, order and meaning as the official export (scripts/export_onnx_model.py).
DECODER_INPUTS = (
    "image_embeddings",  # (1, C, g, g) from encoder.onnx
    "point_coords",  # (1, N, 2) float32 (x, y) in the resized frame, N dynamic
    "point_labels",  # (1, N) float32: 1 fg, 0 bg, 2/3 box corners, -1 padding
    "mask_input",  # (1, 1, 4g, 4g) low-res logits of an earlier prediction
    "has_mask_input",  # (1,) 1.0 to use mask_input, 0.0 to ignore it
    "orig_im_size",  # (2,) float32 (H, W) of the original image
)
# Official point labels of the ONNX interface.
PADDING_LABEL = -1.0
BOX_CORNER_LABELS = (2.0, 3.0)


def encoder_outputs(high_res_features: bool) -> tuple[str, ...]:
    """Output names of encoder.onnx, in order."""
    return (ENCODER_OUTPUT, *HIGH_RES_FEATURES) if high_res_features else (ENCODER_OUTPUT,)


def decoder_inputs(high_res_features: bool) -> tuple[str, ...]:
    """Input names of decoder.onnx, in order: :data:`DECODER_INPUTS`, with the
    high-resolution features after the embedding for a model that takes them."""
    if not high_res_features:
        return DECODER_INPUTS
    return (DECODER_INPUTS[0], *HIGH_RES_FEATURES, *DECODER_INPUTS[1:])


@dataclass(frozen=True)
class DecoderOptions:
    """The official export's switches (``SamOnnxModel`` arguments).

    Attributes:
        return_single_mask: return one mask (C = 1) chosen as the official model does:
            with more than two prompt points (padding and box corners count) the
            single-mask output (token 0), else the multimask output with the best score.
            Otherwise all four outputs (C = 4: token 0, then the three multimask ones).
        use_stability_score: replace the predicted IoU by the stability score of the
            low-res logits (IoU of the masks thresholded at +/- ``stability_score_offset``).
        return_extra_metrics: also output ``stability_scores`` (1, C) and ``areas`` (1, C)
            of the full-size masks.
        stability_score_offset: logit offset of the stability score (official: 1.0).
    """

    return_single_mask: bool = False
    use_stability_score: bool = False
    return_extra_metrics: bool = False
    stability_score_offset: float = 1.0


def decoder_outputs(options: DecoderOptions) -> tuple[str, ...]:
    """Output names of decoder.onnx, in order.

    ``masks`` (1, C, H, W) logits at the original size, ``iou_predictions`` (1, C),
    ``low_res_masks`` (1, C, 4g, 4g); with extra metrics also ``stability_scores``
    and ``areas`` (1, C) before ``low_res_masks``, the official output order.
    """
    if options.return_extra_metrics:
        return ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
    return ("masks", "iou_predictions", "low_res_masks")


@dataclass(frozen=True)
class ModelInfo:
    """Contents of ``model.json``: the model's input conventions and how it was exported."""

    img_size: int
    embedding_shape: tuple[int, int, int, int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    opset: int
    quantized: bool
    decoder: DecoderOptions = DecoderOptions()
    model: str | None = None
    checkpoint: str | None = None
    image_format: str = "RGB"
    mask_threshold: float = 0.0
    high_res_features: bool = False  # encoder and decoder carry HIGH_RES_FEATURES
    segany_version: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    encoder_input: str = field(
        default="image (1, 3, h, w) float32 RGB 0-255, resized so that max(h, w) = img_size; "
        "normalised and padded inside the graph"
    )

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """(4g, 4g): the low-res mask size of ``mask_input`` and ``low_res_masks``."""
        return 4 * self.embedding_shape[2], 4 * self.embedding_shape[3]

    def to_json(self) -> str:
        data = asdict(self)
        head = {key: data.pop(key) for key in ("format", "format_version", "model", "checkpoint")}
        data["mask_input_size"] = list(self.mask_input_size)  # for readers of the file
        return json.dumps({**head, **data}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["decoder"] = DecoderOptions(**values.get("decoder", {}))
        for key in ("embedding_shape", "pixel_mean", "pixel_std"):
            values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelInfo:
        """Read ``model_dir/model.json``; SeganyError if it is missing or not ours."""
        path = Path(model_dir) / METADATA_FILE
        if not path.is_file():
            raise SeganyError(f"{path} not found; give a folder written by `segany export -o DIR`")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT_NAME:
                raise ValueError(f"format is {data.get('format')!r}")
            if data.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError("written by a newer segany; upgrade segany")
            return cls.from_dict(data)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise SeganyError(f"{path} is not a segany ONNX model description ({error})") from None

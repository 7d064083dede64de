"""What ``segany export`` writes and the ONNX Runtime predictor reads (no PyTorch needed).

An export folder holds:

* ``encoder.onnx``: input ``image``, see below. Output ``image_embeddings``
  (1, C, g, g), g = ``img_size`` / 16; for a model whose decoder takes high-resolution
  features (``high_res_features`` in ``model.json``: SAM 2, segany's ``default``) also
  :data:`HIGH_RES_FEATURES`.
* ``decoder.onnx``: the official SAM ONNX decoder interface (``SamOnnxModel`` of
  ``segment-anything``), see :func:`decoder_inputs` and :func:`decoder_outputs`; with
  high-resolution features, those come right after ``image_embeddings`` (the layout of
  the community SAM 2 exports).
* ``model.json``: :class:`ModelInfo`, what a runtime needs besides the graphs.

The two families (``family`` in ``model.json``) differ in what surrounds the graphs:

* SAM (:data:`SAM`; also MobileSAM and segany's own models): ``image`` is (1, 3, h, w)
  float32 RGB pixel values 0-255 of the image resized so that max(h, w) = ``img_size``
  (:data:`RESIZE_LONGEST_SIDE`: Pillow bilinear on uint8, see
  :class:`segany.resize.ResizeLongestSide`); h and w are dynamic. Normalisation by
  ``pixel_mean``/``pixel_std`` and zero padding bottom/right happen in the graph. Prompt
  coordinates scale by the resize's one factor; the decoder takes clicks, then the box
  corners, and a padding point only when there is no box. The masks are upscaled to the
  padded square, cropped and resized to the original size.
* SAM 2 (:data:`SAM2`): ``image`` is (1, 3, S, S), S = ``img_size``, the model input
  itself (:data:`RESIZE_SQUARE`): the pixels / ``pixel_scale`` (255), squashed to S x S
  whatever the aspect ratio (bilinear, antialiased when a side shrinks, no padding), minus
  ``pixel_mean`` over ``pixel_std`` (ImageNet's, on the 0-1 scale). The runtime does all
  of it (``normalized_input``). Prompt coordinates scale per axis (x * S / W, y * S / H);
  the decoder takes the box corners first, then the clicks, then always one padding
  point (SAM 2's predictor never uses the prompt encoder's box path). The masks are the
  low-res logits resized straight to the original size (bilinear, align_corners=False);
  ``low_res_masks`` are clamped to +-32 and ``iou_predictions`` are in [0, 1], as Meta's
  predictor returns them. One mask (no multimask output) is SAM 2's choice
  (``dynamic_multimask_stability``): token 0 if its stability score reaches the
  threshold, else the multimask output of highest predicted IoU.

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
# The newest ``format_version`` this segany reads. SAM exports are written as version 1,
# which every segany reads; SAM 2 exports as version 2, so that a segany from before SAM 2
# refuses them (it would run them with SAM's conventions) instead of giving wrong masks.
FORMAT_VERSION = 2
SAM_FORMAT_VERSION = 1
SAM2_FORMAT_VERSION = 2
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

# Model families (``ModelInfo.family``) and their image resizing (``ModelInfo.resize``).
SAM = "sam"
SAM2 = "sam2"
FAMILIES = (SAM, SAM2)
RESIZE_LONGEST_SIDE = "longest_side"  # long side to img_size, Pillow bilinear, padded
RESIZE_SQUARE = "square"  # squashed to img_size x img_size, bilinear with antialiasing
RESIZES = (RESIZE_LONGEST_SIDE, RESIZE_SQUARE)
# What each family's export writes in model.json besides the model's numbers: its
# image input's conventions (see ModelInfo) and the format version that introduced it.
FAMILY_CONVENTIONS: dict[str, dict[str, Any]] = {
    SAM: {
        "resize": RESIZE_LONGEST_SIDE,
        "normalized_input": False,
        "pixel_scale": 1.0,
        "format_version": SAM_FORMAT_VERSION,
        "encoder_input": "image (1, 3, h, w) float32 RGB 0-255, resized so that "
        "max(h, w) = img_size; normalised and padded inside the graph",
    },
    SAM2: {
        "resize": RESIZE_SQUARE,
        "normalized_input": True,
        "pixel_scale": 255.0,
        "format_version": SAM2_FORMAT_VERSION,
        "encoder_input": "image (1, 3, img_size, img_size) float32: RGB / pixel_scale, "
        "squashed to img_size x img_size (bilinear, antialiased), minus pixel_mean, "
        "over pixel_std",
    },
}


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
            single-mask output (token 0), else the multimask output with the best score;
            for SAM 2, SAM 2's choice (token 0 if stable, else the best multimask output
            by score). Otherwise all four outputs (C = 4: token 0, then the three
            multimask ones).
        use_stability_score: replace the predicted IoU by the stability score of the
            low-res logits (IoU of the masks thresholded at +/- ``stability_score_offset``);
            a single mask is then chosen by that score.
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
    """Contents of ``model.json``: the model's input conventions and how it was exported.

    A file written before SAM 2 was exportable has none of ``family`` to
    ``dynamic_multimask_stability``; their defaults are SAM's conventions, which it used.

    Attributes (the ones a runtime reads beyond the graphs' shapes):
        family: :data:`SAM` or :data:`SAM2`, whose prompt and mask conventions the module
            documentation describes.
        resize: :data:`RESIZE_LONGEST_SIDE` or :data:`RESIZE_SQUARE`.
        normalized_input: the encoder takes the normalised image
            ((pixels / pixel_scale - pixel_mean) / pixel_std, made by the runtime);
            otherwise pixel values 0-255, normalised in the graph.
        pixel_scale: with :data:`RESIZE_SQUARE`, what pixel values are divided by before
            the resize (255: SAM 2's ``pixel_mean``/``pixel_std`` are on the 0-1 scale);
            1 for SAM, whose statistics are on the 0-255 scale.
        dynamic_multimask_stability: (delta, threshold) of SAM 2's single-mask choice,
            or None (SAM: token 0 is the single mask).
    """

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
    family: str = SAM
    resize: str = RESIZE_LONGEST_SIDE
    normalized_input: bool = False
    pixel_scale: float = 1.0
    dynamic_multimask_stability: tuple[float, float] | None = None
    segany_version: str = ""
    format: str = FORMAT_NAME
    format_version: int = SAM_FORMAT_VERSION
    encoder_input: str = field(default=FAMILY_CONVENTIONS[SAM]["encoder_input"])

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family is {self.family!r}, not one of {', '.join(FAMILIES)}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize is {self.resize!r}, not one of {', '.join(RESIZES)}")

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
        if values.get("dynamic_multimask_stability") is not None:
            values["dynamic_multimask_stability"] = tuple(values["dynamic_multimask_stability"])
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

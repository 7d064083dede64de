"""Export a SAM or SAM 2 model to ONNX: an image encoder and the official decoder interface.

:func:`export_onnx` writes ``encoder.onnx``, ``decoder.onnx`` and ``model.json`` into a
folder (layout and tensor conventions in :mod:`segany.onnx.format`). The decoder takes
the official export's inputs and gives its outputs, so front ends written for
``segment-anything``'s ONNX model run segany models unchanged.

The two families share the wrappers below and differ only where their models do: a
:class:`~segany.modeling.sam2.Sam2` model's encoder graph starts at its preprocessed,
squashed model input (:class:`Sam2OnnxEncoder`: a fixed S x S, so nothing in it is
dynamic) and its decoder graph resizes the masks straight to the original size, chooses
a single mask as SAM 2 does and clamps the low-res logits as Meta's predictor does
(:class:`Sam2OnnxDecoder`).

How it is exported: PyTorch's ``torch.export``-based ONNX exporter (opset 18 or newer;
the older TorchScript exporter cannot trace the channel count of ``LayerNorm2d`` once
shapes are dynamic). Attention uses ``F.scaled_dot_product_attention``; it is exported
under the math SDPA backend, whose output layout the exporter's decomposition expects
(with the default backend the ViT encoders fail with a view/stride error). Dynamic sizes
are declared ``Dim.AUTO`` so that speed branches on sizes in the modeling code do not
stop the export (see :func:`_export_graph`). The modeling code is unchanged: the
wrappers below only call it.

``--quantize`` is ONNX Runtime's dynamic quantisation with uint8 weights, per channel
(see :func:`quantize`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import __version__
from ..atomic import commit_file, write_text_atomic
from ..errors import SeganyError
from ..masks import stability_score
from ..modeling import Sam
from ..modeling.sam2 import Sam2
from ..sam2_predictor import LOW_RES_LIMIT
from .format import (
    DECODER_FILE,
    ENCODER_FILE,
    ENCODER_INPUT,
    FAMILY_CONVENTIONS,
    METADATA_FILE,
    SAM,
    SAM2,
    DecoderOptions,
    ModelInfo,
    decoder_inputs,
    decoder_outputs,
    encoder_outputs,
)

MIN_OPSET = 18  # the lowest opset PyTorch's exporter emits without a lossy conversion
DEFAULT_OPSET = 18
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")

# The models this module exports.
SamModel = Sam | Sam2


# -------------------------------------------------------------------------------------
# Export wrappers
# -------------------------------------------------------------------------------------


class SamOnnxEncoder(nn.Module):
    """Image encoder with SAM's normalisation and padding in the graph.

    Input ``image`` (1, 3, h, w) float RGB 0-255, resized so that max(h, w) = img_size;
    output (1, C, img_size / 16, img_size / 16), followed for a decoder with
    high-resolution features by those, (1, C/8, 4g, 4g) and (1, C/4, 2g, 2g).
    """

    # Input axes the graph keeps dynamic, by input name.
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {ENCODER_INPUT: {2: "height", 3: "width"}}

    def __init__(self, model: SamModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        embedding, high_res = self.model.encode_image(self.preprocess(image))
        return embedding if high_res is None else (embedding, *high_res)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """What the graph does before the encoder: SAM's normalisation and padding."""
        return self.model.preprocess(image)

    def sample_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs to export with and to check the export on."""
        return (sample_encoder_input(self.model.image_size),)


class Sam2OnnxEncoder(SamOnnxEncoder):
    """SAM 2's image encoder from its model input: ``image`` (1, 3, S, S) float32, the
    image squashed to S x S and normalised (:meth:`Sam2.preprocess`, done by the runtime:
    its antialiased resize of an image of any size cannot be a fixed-size graph input
    and has no ONNX operator). Outputs as :class:`SamOnnxEncoder`'s, ``image_embeddings``
    with ``no_mem_embed`` added (:meth:`Sam2.encode_image`)."""

    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {}

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def sample_inputs(self) -> tuple[torch.Tensor, ...]:
        """A (1, 3, S, S) normalised-looking input (values about N(0, 1))."""
        size = self.model.image_size
        generator = torch.Generator().manual_seed(0)
        return (torch.randn((1, 3, size, size), generator=generator),)


def onnx_encoder(model: SamModel) -> SamOnnxEncoder:
    """The encoder wrapper that fits ``model`` (SAM or SAM 2)."""
    return Sam2OnnxEncoder(model) if isinstance(model, Sam2) else SamOnnxEncoder(model)


def select_single_mask(
    masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ONNX model's choice of one mask out of (1, T, h, w) / (1, T).

    With more than two prompt points (padding and box corners count) token 0, the
    single-mask output, wins by a large margin; with fewer it loses and the best-scoring
    multimask output is taken. Done arithmetically because the graph has no branches.
    """
    # The point count as a tensor computed in the graph: Python arithmetic on the
    # symbolic size would make the exporter specialise on it.
    num_points = torch.ones_like(point_labels).sum(dim=1, keepdim=True)
    weight = torch.zeros(scores.shape[1], dtype=scores.dtype)
    weight[0] = 1000.0
    best = torch.argmax(scores + (num_points - 2.5) * weight, dim=1)
    rows = torch.arange(masks.shape[0])
    return masks[rows, best].unsqueeze(1), scores[rows, best].unsqueeze(1)


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + upscaling with the official ONNX interface.

    Inputs (see :data:`segany.onnx.format.DECODER_INPUTS`): image embeddings
    (1, C, g, g); point coords (1, N, 2) in the resized frame and labels (1, N)
    (1 fg, 0 bg, 2/3 box corners, -1 padding; the caller appends one padding point
    when there is no box, as the official model expects); mask input (1, 1, 4g, 4g)
    with has_mask_input (1,); orig_im_size (2,) as (H, W).

    Outputs: mask logits (1, C, H, W) at the original size, scores (1, C), low-res
    logits (1, C, 4g, 4g); C = 4 (token 0 = single-mask output, 1-3 = multimask) or 1
    with ``return_single_mask``; see :class:`segany.onnx.format.DecoderOptions`.
    """

    def __init__(self, model: SamModel, options: DecoderOptions | None = None) -> None:
        super().__init__()
        self.model = model
        self.options = options or DecoderOptions()
        # A constant of the model: computed once here rather than in every run.
        self.register_buffer("image_pe", model.prompt_encoder.get_dense_pe(), persistent=False)

    def _dense_embedding(self, mask_input: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
        """has_mask (1,) switches between the embedded mask and the "no mask" embedding."""
        prompt_encoder = self.model.prompt_encoder
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask * prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask) * no_mask

    def _input_size(self, orig_size: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the resized image before padding, from the int64 (H, W).

        In float64, so that it rounds exactly as ``ResizeLongestSide.get_preprocess_shape``
        (the official graph uses float32, which can differ by a pixel at rare sizes).
        """
        size = orig_size.to(torch.float64)
        resized = torch.floor(size * (self.model.image_size / size.max()) + 0.5).long()
        return _positive_size(resized, self.model.image_size)

    def _upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """SAM's post-processing: upscale to the padded input, crop the image, resize to
        (H, W). Written here, not ``Sam.postprocess_masks``, because that one sizes its
        work with Python arithmetic, which the exporter cannot keep symbolic."""
        orig_size = orig_im_size.long()
        size = self.model.image_size
        masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        height, width = self._input_size(orig_size)
        masks = masks[..., :height, :width]
        return _resize_to(masks, orig_size)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return self.decode(
            image_embeddings,
            None,
            point_coords,
            point_labels,
            mask_input,
            has_mask_input,
            orig_im_size,
        )

    def decode(
        self,
        image_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The graph of both interfaces (:meth:`forward`'s inputs, with or without the
        high-resolution features)."""
        options = self.options
        threshold = self.model.mask_threshold
        # The caller has already padded the points, so no padding here.
        sparse = self.model.prompt_encoder._embed_points(point_coords, point_labels, pad=False)
        dense = self._dense_embedding(mask_input, has_mask_input)
        low_res, scores = self.model.mask_decoder.predict_masks(
            image_embeddings, self.image_pe, sparse, dense, high_res_features=high_res_features
        )
        if options.use_stability_score:
            scores = stability_score(low_res, threshold, options.stability_score_offset)
        if options.return_single_mask:
            low_res, scores = self._single_mask(low_res, scores, point_labels)
        masks = self._upscale(low_res, orig_im_size)
        low_res_out = self._low_res_output(low_res)
        if not options.return_extra_metrics:
            return masks, scores, low_res_out
        stability = stability_score(masks, threshold, options.stability_score_offset)
        areas = (masks > threshold).sum(dim=(-2, -1))
        return masks, scores, stability, areas, low_res_out

    def _single_mask(
        self, masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask of (1, T, h, w) / (1, T) for ``return_single_mask``: the official rule."""
        return select_single_mask(masks, scores, point_labels)

    def _low_res_output(self, low_res: torch.Tensor) -> torch.Tensor:
        """The ``low_res_masks`` output: the logits as they are, for SAM."""
        return low_res


class SamOnnxHighResDecoder(SamOnnxDecoder):
    """:class:`SamOnnxDecoder` for a mask decoder with high-resolution features: the
    encoder's two extra outputs come right after ``image_embeddings``."""

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return self.decode(
            image_embeddings,
            [high_res_feats_0, high_res_feats_1],
            point_coords,
            point_labels,
            mask_input,
            has_mask_input,
            orig_im_size,
        )


class Sam2OnnxDecoder(SamOnnxHighResDecoder):
    """SAM 2's decoder (inputs and outputs as :class:`SamOnnxHighResDecoder`'s).

    What differs, as Meta's ``SAM2ImagePredictor``: point coordinates are in the S x S
    square's pixels, scaled per axis; the masks are the low-res logits resized straight to
    the original size (the image was squashed, not padded); ``low_res_masks`` are clamped
    to +-32 (the masks are made before the clamp); ``iou_predictions`` end in SAM 2's
    sigmoid; ``return_single_mask`` is SAM 2's choice (token 0 if stable, else the best
    multimask output).
    """

    def _upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        return _resize_to(low_res, orig_im_size.long())

    def _single_mask(
        self, masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.mask_decoder.stable_single_or_best_multimask(masks, scores)

    def _low_res_output(self, low_res: torch.Tensor) -> torch.Tensor:
        # Meta's predictor returns them clamped; they are fed back as mask input.
        return low_res.clamp(-LOW_RES_LIMIT, LOW_RES_LIMIT)


def onnx_decoder(model: SamModel, options: DecoderOptions | None = None) -> SamOnnxDecoder:
    """The decoder wrapper that fits ``model`` (SAM 2, SAM with high-resolution features
    or plain SAM)."""
    if isinstance(model, Sam2):
        wrapper: type[SamOnnxDecoder] = Sam2OnnxDecoder
    elif model.mask_decoder.use_high_res_features:
        wrapper = SamOnnxHighResDecoder
    else:
        wrapper = SamOnnxDecoder
    return wrapper(model, options)


def _resize_to(masks: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) -> (1, C, H, W) bilinearly, (H, W) the int64 (2,) ``size``."""
    return F.interpolate(masks, _positive_size(size), mode="bilinear", align_corners=False)


def _positive_size(size: torch.Tensor, limit: int | None = None) -> tuple[int, int]:
    """(h, w) Python ints of a (2,) int64 tensor; data-dependent (symbolic) when exporting."""
    h, w = size[0].item(), size[1].item()
    for value in (h, w):
        # Bounds the exporter needs to reason about slices and output sizes.
        torch._check(value >= 1)
        if limit is not None:
            torch._check(value <= limit)
    return h, w


# -------------------------------------------------------------------------------------
# Exporting
# -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """Where the files went and how close ONNX Runtime came to PyTorch on sample inputs.

    ``max_abs_diff`` maps "encoder"/"decoder" to the largest |ORT - PyTorch| over all
    float outputs (for a quantised export: the quantisation error on those inputs).
    """

    model_dir: Path
    files: tuple[Path, ...]
    info: ModelInfo
    max_abs_diff: dict[str, float]


def check_export_packages() -> None:
    """SeganyError naming what to install when the exporter's packages are missing."""
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise SeganyError(f"ONNX export needs {', '.join(missing)}: pip install 'segany[export]'")


def check_opset(opset: int) -> int:
    """``opset`` if PyTorch's exporter and this ONNX can produce it; SeganyError otherwise."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise SeganyError(f"--opset must be between {MIN_OPSET} and {newest}, got {opset}")
    return opset


def sample_encoder_input(img_size: int) -> torch.Tensor:
    """(1, 3, S, 3S/4) pixel values: a landscape-free shape so neither side specialises."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand((1, 3, img_size, img_size * 3 // 4), generator=generator) * 255


def sample_decoder_inputs(model: SamModel) -> tuple[torch.Tensor, ...]:
    """Official-style dummy inputs: five points of every label, a mask, a 400 x 600 image
    (small, to keep the check after export quick; sizes are dynamic anyway)."""
    generator = torch.Generator().manual_seed(0)
    prompt_encoder = model.prompt_encoder
    grid = prompt_encoder.image_embedding_size
    dim = prompt_encoder.embed_dim
    high_res: tuple[torch.Tensor, ...] = ()
    if model.mask_decoder.use_high_res_features:
        # (1, C/8, 4g, 4g) and (1, C/4, 2g, 2g), as Sam.encode_image gives them.
        high_res = tuple(
            torch.randn(
                (1, dim // 8 * 4 // scale, scale * grid[0], scale * grid[1]), generator=generator
            )
            for scale in (4, 2)
        )
    return (
        torch.randn((1, dim, *grid), generator=generator),
        *high_res,
        torch.rand((1, 5, 2), generator=generator) * model.image_size,
        torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]]),
        torch.randn((1, 1, *prompt_encoder.mask_input_size), generator=generator),
        torch.tensor([1.0]),
        torch.tensor([400.0, 600.0]),
    )


def _export_graph(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """Export ``module`` to ``path`` with the named axes of the named inputs dynamic.

    The axes are declared ``Dim.AUTO``: a speed branch on a size in the modeling code
    (e.g. a different attention order for few tokens) then only narrows the range the
    exporter assumes instead of failing; the graph holds the branch taken for the sample,
    which computes the same values. An axis that ends up fixed is an error.
    """
    dynamic_shapes = tuple(
        {axis: torch.export.Dim.AUTO for axis in dynamic_axes[name]}
        if name in dynamic_axes
        else None
        for name in input_names
    )
    # The exporter's deprecation, tracing and "torchvision is not installed" notes are not
    # for segany's users.
    # torch.export also prints partial graphs to stderr when a strategy fails and the
    # exporter tries the next one; errors that end the export are raised all the same.
    with (
        torch.no_grad(),
        sdpa_kernel(SDPBackend.MATH),
        warnings.catch_warnings(),
        _quiet_loggers("torch.onnx", "torch.export"),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            inputs,
            dynamo=True,
            opset_version=opset,
            verbose=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
        )
    _name_dynamic_axes(program.model, dynamic_axes)
    program.save(str(path))


def _name_dynamic_axes(model: Any, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Give the exporter's symbols (``s55``) readable names (``num_points``) in the whole
    ONNX IR ``model``; RuntimeError if an axis meant to be dynamic was fixed."""
    import onnx_ir as ir

    if not dynamic_axes:  # a fixed-size graph (SAM 2's encoder): nothing to name
        return
    inputs = {value.name: value for value in model.graph.inputs}
    renames = {}
    for name, axes in dynamic_axes.items():
        for axis, label in axes.items():
            dim = inputs[name].shape[axis]
            if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
                raise RuntimeError(
                    f"the exporter fixed axis {axis} of {name} to {dim}: the modeling code "
                    "branches on that size in a way the export cannot keep dynamic"
                )
            renames[dim.value] = label
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    values = [*model.graph.inputs, *model.graph.outputs]
    values += [
        out for node in ir.traversal.RecursiveGraphIterator(model.graph) for out in node.outputs
    ]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape(
                ir.SymbolicDim(pattern.sub(lambda m: renames[m.group(1)], dim.value))
                if isinstance(dim, ir.SymbolicDim) and dim.value is not None
                else dim
                for dim in value.shape
            )


def export_encoder(model: SamModel, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write the image encoder (:func:`onnx_encoder`) to ``path``; for SAM, h and w are
    dynamic."""
    encoder = onnx_encoder(model)
    _export_graph(
        encoder,
        encoder.sample_inputs(),
        path,
        (ENCODER_INPUT,),
        encoder_outputs(model.mask_decoder.use_high_res_features),
        encoder.dynamic_axes,
        opset,
    )


def export_decoder(
    model: SamModel, path: Path, options: DecoderOptions | None = None, opset: int = DEFAULT_OPSET
) -> None:
    """Write :func:`onnx_decoder` to ``path``; the number of points N is dynamic (>= 0)."""
    options = options or DecoderOptions()
    _export_graph(
        onnx_decoder(model, options),
        sample_decoder_inputs(model),
        path,
        decoder_inputs(model.mask_decoder.use_high_res_features),
        decoder_outputs(options),
        {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        opset,
    )


def quantize(source: Path, target: Path) -> None:
    """uint8 dynamic quantisation of the weights of ``source`` into ``target``.

    As the official export's ``--quantize-out`` but per output channel: with one scale per
    tensor, convolutions with folded batch norms (the ``default`` model's encoder) lose
    their embedding (mask IoU 0.3-0.6 against float32 on random weights); per channel
    keeps mask IoU above 0.95 for every architecture tried. Products with a stacked
    (3-D) constant, such as the decoder's per-head and per-hypernetwork weights, stay
    float: onnxruntime's quantised product takes per-channel scales for 2-D weights only.
    Grouped (depthwise) convolutions stay float too: each output channel has only its
    k x k weights of one input channel, so uint8 rounding is large against them, and they
    are a small part of the file (the ``default`` model v2 on the demo photo: mask IoU
    against float32 0.49-0.95 with them quantised, 0.87-0.98 without; 6.4 of 21 MB).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_loggers(""):  # the quantiser advises pre-processing on the root logger
        quantize_dynamic(
            source,
            target,
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QUInt8,
            use_external_data_format=_is_large(source),
            nodes_to_exclude=_nodes_kept_float(source),
        )


def _nodes_kept_float(path: Path) -> list[str]:
    """Names of the nodes of an ONNX file that :func:`quantize` leaves in float: MatMul
    nodes whose constant operand is not 2-D, and grouped convolutions."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    ranks = {tensor.name: len(tensor.dims) for tensor in graph.initializer}

    def grouped(node: onnx.NodeProto) -> bool:
        return any(a.name == "group" and a.i > 1 for a in node.attribute)

    return [
        node.name
        for node in graph.node
        if (node.op_type == "MatMul" and any(ranks.get(name, 2) != 2 for name in node.input))
        or (node.op_type == "Conv" and grouped(node))
    ]


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from the named loggers ("" is the root) while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _is_large(path: Path) -> bool:
    """Whether a graph keeps its weights outside the protobuf (over 2 GB)."""
    return path.with_name(path.name + ".data").exists()


def max_difference(
    path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...]
) -> float:
    """Largest |ORT - PyTorch| over the float outputs of ``module`` on ``inputs``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: x.numpy() for name, x in zip(names, inputs, strict=True)})
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(
        float(np.abs(e.numpy() - g).max())
        for e, g in zip(expected, got, strict=True)
        if e.is_floating_point()
    )


def _model_info(
    model: SamModel,
    opset: int,
    quantized: bool,
    options: DecoderOptions,
    name: str | None,
    checkpoint: str | None,
) -> ModelInfo:
    grid = model.prompt_encoder.image_embedding_size
    decoder = model.mask_decoder
    single_mask_choice = None
    if getattr(decoder, "dynamic_multimask_via_stability", False):
        single_mask_choice = (
            float(decoder.dynamic_multimask_stability_delta),
            float(decoder.dynamic_multimask_stability_thresh),
        )
    family = SAM2 if isinstance(model, Sam2) else SAM
    return ModelInfo(
        img_size=model.image_size,
        embedding_shape=(1, model.prompt_encoder.embed_dim, *grid),
        pixel_mean=_rounded(model.pixel_mean),
        pixel_std=_rounded(model.pixel_std),
        opset=opset,
        quantized=quantized,
        decoder=options,
        model=name,
        checkpoint=checkpoint,
        image_format=model.image_format,
        mask_threshold=float(model.mask_threshold),
        high_res_features=decoder.use_high_res_features,
        family=family,
        dynamic_multimask_stability=single_mask_choice,
        segany_version=__version__,
        # SAM 2's resize and normalisation are the runtime's (see Sam2OnnxEncoder).
        **FAMILY_CONVENTIONS[family],
    )


def _rounded(values: torch.Tensor) -> tuple[float, ...]:
    """float32 values as the short decimals they came from (123.675, not 123.67500305)."""
    return tuple(float(f"{value:.7g}") for value in values.flatten().tolist())


def check_output_dir(path: str | Path) -> Path:
    """``path`` as a folder to export into; SeganyError if it is a file."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise SeganyError(f"output {str(path)!r} is a file; give a folder for -o")
    return directory


def export_onnx(
    model: SamModel,
    output_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    quantize_weights: bool = False,
    decoder_options: DecoderOptions | None = None,
    model_name: str | None = None,
    checkpoint: str | None = None,
) -> ExportResult:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``model.json`` into ``output_dir``.

    Args:
        model: a CPU model, SAM (:class:`~segany.modeling.Sam`) or SAM 2
            (:class:`~segany.modeling.sam2.Sam2`); it is put in eval mode.
        opset: ONNX opset, at least 18.
        quantize_weights: uint8 dynamic quantisation of both graphs (about 4x smaller;
            masks change slightly).
        decoder_options: the official export's switches; the default (all four mask
            outputs, predicted IoU) is what :class:`segany.onnx.predictor.OnnxSamPredictor`
            needs.
        model_name, checkpoint: recorded in ``model.json``.

    Files are built in a temporary folder inside ``output_dir`` and moved in when all are
    complete, ``model.json`` last; a failed export leaves an earlier one intact.
    """
    check_export_packages()
    check_opset(opset)
    if model.device.type != "cpu":
        raise SeganyError(f"export a model on the CPU, not {model.device}; use model.cpu()")
    options = decoder_options or DecoderOptions()
    directory = check_output_dir(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    with tempfile.TemporaryDirectory(prefix=".segany-export-", dir=directory) as scratch:
        graphs, differences = _write_graphs(model, Path(scratch), options, opset, quantize_weights)
        files = _move_into(directory, graphs)
    info = _model_info(model, opset, quantize_weights, options, model_name, checkpoint)
    metadata = write_text_atomic(directory / METADATA_FILE, info.to_json())
    return ExportResult(directory, (*files, metadata), info, differences)


def _write_graphs(
    model: SamModel, work: Path, options: DecoderOptions, opset: int, quantize_weights: bool
) -> tuple[list[Path], dict[str, float]]:
    """Export (and quantise) both graphs into ``work``; check each with ONNX Runtime.

    Returns the files to keep (graphs and their external weights) and the largest
    |ORT - PyTorch| of each graph on its sample inputs.
    """
    export_encoder(model, work / ENCODER_FILE, opset)
    export_decoder(model, work / DECODER_FILE, options, opset)
    encoder = onnx_encoder(model)
    checks = {
        ENCODER_FILE: (encoder, encoder.sample_inputs(), (ENCODER_INPUT,)),
        DECODER_FILE: (
            onnx_decoder(model, options),
            sample_decoder_inputs(model),
            decoder_inputs(model.mask_decoder.use_high_res_features),
        ),
    }
    final = work / "quantized" if quantize_weights else work
    final.mkdir(exist_ok=True)
    differences = {}
    for file_name, (module, inputs, names) in checks.items():
        if quantize_weights:
            quantize(work / file_name, final / file_name)
        differences[Path(file_name).stem] = max_difference(final / file_name, module, inputs, names)
    return sorted(final.glob("*.onnx*")), differences


def _move_into(directory: Path, produced: list[Path]) -> tuple[Path, ...]:
    """Move finished graph files into ``directory``; drop weight files of an earlier export
    that this one does not have (they would belong to nothing)."""
    names = {path.name for path in produced}
    for graph in (ENCODER_FILE, DECODER_FILE):
        stale = directory / f"{graph}.data"
        if stale.name not in names and stale.exists():
            stale.unlink()
    return tuple(commit_file(path, directory / path.name) for path in produced)

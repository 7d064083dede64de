"""SAM's mask decoder for inference: many prompt sets against one prepared image.

:class:`FastMaskDecoder` computes what :class:`~segany.modeling.mask_decoder.MaskDecoder`
computes (the tests hold it to the modeling module and to Meta's code), faster:

* what depends only on the weights is made once, when the decoder is prepared: the grid
  encoding and its terms through the attention projections, the hypernetwork MLPs stacked
  into batched products, the upscaling's transposed convolutions as kernel-row products;
* what depends only on the image is made once per image (:meth:`prepare_image`): the
  transformer's image side with its first layer's projections, and the high-resolution
  features laid out for the upscaling passes;
* prompt sets are decoded in chunks that stay in the CPU's caches, a set whose masks all
  fall under ``min_iou`` is not upscaled, and the attentions take their cheapest exact
  form (:mod:`.attention`).

It works in the dtype of the decoder it is given (a bfloat16 copy on a CPU, see
:mod:`.model`); its inputs come in that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.mask_decoder import MaskDecoder
from . import transformer as fast
from .transformer import PreparedImage

# Prompt sets decoded together. The per-set image features (4 MB each at SAM's size) of a
# few sets stay in cache between the decoder's passes over them; 64 at once (the mask
# generator's batch) measured 10-15% slower on 2 CPU cores, and need 16x the memory.
PROMPT_CHUNK = 4

KernelRows = list[tuple[torch.Tensor, torch.Tensor | None]]
HighResLayout = tuple[list[torch.Tensor], list[torch.Tensor]]


@dataclass
class ImageSide:
    """One image as the decoder reads it, from :meth:`FastMaskDecoder.prepare_image`.

    Attributes:
        embedding: (1, C, h, w) image embedding.
        transformer: the transformer's image side for prompts without a mask prompt (the
            embedding plus the no-mask embedding), with its first layer's projections.
        high_res: the projected high-resolution features ((1, C/8, 4h, 4w),
            (1, C/4, 2h, 2w)), or None for a decoder without them.
        high_res_layout: those features in the upscaling's pixel layout.
        generation: the :attr:`InferenceModel.generation` of the weights it was made with.
    """

    embedding: torch.Tensor
    transformer: PreparedImage
    high_res: list[torch.Tensor] | None = None
    high_res_layout: HighResLayout | None = None
    generation: int = 0


class FastMaskDecoder:
    """A :class:`MaskDecoder` prepared for inference (see the module documentation).

    Args:
        decoder: the decoder, in the dtype to run in; read, not changed. Made again
            when its weights change (:class:`~segany.inference.model.InferenceModel`
            does so).
        image_pe: (1, C, h, w) positional encoding of the grid (``get_dense_pe``), in the
            decoder's dtype.
        no_mask: (1, C, 1, 1) the prompt encoder's no-mask embedding, in that dtype.
        fold: the attention forms (None: by the cost model; True/False forced, for tests).
    """

    def __init__(
        self,
        decoder: MaskDecoder,
        image_pe: torch.Tensor,
        no_mask: torch.Tensor,
        fold: bool | None = None,
    ) -> None:
        self.decoder = decoder
        self.fold = fold
        self.key_pe = fast.flat_grid(image_pe)
        self.no_mask = no_mask
        self.positional = fast.positional_terms(decoder.transformer, self.key_pe)
        self.hypernetworks = _stacked_hypernetworks(decoder)
        first, _, _, second, _ = decoder.output_upscaling
        self.kernel_rows = (_kernel_rows(first), _kernel_rows(second))

    def prepare_image(
        self, embedding: torch.Tensor, high_res: list[torch.Tensor] | None = None
    ) -> ImageSide:
        """The (1, C, h, w) ``embedding`` (and a decoder's projected high-resolution
        features, batch 1) of one image, prepared for decoding prompts against it."""
        self.decoder.check_high_res(high_res)
        keys = fast.flat_grid(embedding + self.no_mask)
        image = fast.prepare_image(self.decoder.transformer, keys, self.key_pe, self.positional)
        layout = None if high_res is None else _kernel_row_layout(high_res, 0)
        return ImageSide(embedding, image, high_res, layout)

    def decode_image(
        self,
        image: ImageSide,
        sparse: torch.Tensor,
        multimask_output: bool,
        min_iou: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for (B, N, C) prompt tokens without a mask prompt against a prepared image.

        Args:
            min_iou: upscale only the prompt sets with a returned mask whose predicted IoU
                (in float32) is above this; the others' logits are -inf (empty masks).
                For callers that drop masks under a predicted-IoU threshold anyway, as the
                automatic mask generator does: the upscaling is most of a decode.

        Returns:
            Mask logits (B, 3 or 1, 4h, 4w) and predicted IoU (B, 3 or 1), as
            ``MaskDecoder.forward``.
        """
        size = image.embedding.shape[-2:]
        high_res = (image.high_res, image.high_res_layout)
        return self._decode(image.transformer, sparse, size, multimask_output, min_iou, high_res)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
        min_iou: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder.forward`` on any inputs (e.g. a mask prompt, one embedding per
        prompt set); ``min_iou`` as in :meth:`decode_image`."""
        self.decoder.check_high_res(high_res_features)
        batch = sparse.shape[0]
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets; "
                "give one embedding or one per prompt set"
            )
        # A dense prompt equal for all sets (the no-mask embedding, expanded) keeps the image
        # side at batch 1, so the transformer works on it once for all the sets.
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]
        keys = fast.flat_grid(image_embeddings + dense)
        # Projecting a shared side pays when several chunks will read it.
        image = fast.prepare_image(
            self.decoder.transformer, keys, self.key_pe, self.positional, batch > PROMPT_CHUNK
        )
        shared = high_res_features is not None and all(f.shape[0] == 1 for f in high_res_features)
        layout = _kernel_row_layout(high_res_features, 0) if shared else None
        size = image_embeddings.shape[-2:]
        high_res = (high_res_features, layout)
        return self._decode(image, sparse, size, multimask_output, min_iou, high_res)

    def _decode(
        self,
        image: PreparedImage,
        sparse: torch.Tensor,
        size: torch.Size,
        multimask_output: bool,
        min_iou: float | None,
        high_res: tuple[list[torch.Tensor] | None, HighResLayout | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both decodes, in chunks of :data:`PROMPT_CHUNK` prompt sets."""
        # SAM 2's decoder may answer a single-mask request with a multimask output.
        choose_single = not multimask_output and self.decoder.dynamic_multimask_via_stability
        selected = slice(1, None) if multimask_output else slice(0, 1)
        if choose_single:
            selected = slice(None)
        batch = sparse.shape[0]
        tokens = torch.cat([self.decoder.output_tokens(batch).to(sparse.dtype), sparse], dim=1)
        features, layout = high_res
        parts = []
        for start in range(0, batch, PROMPT_CHUNK):
            chunk = slice(start, start + PROMPT_CHUNK)
            chunk_image = image
            if image.keys.shape[0] > 1:  # one image side per prompt set
                chunk_image = PreparedImage(image.keys[chunk], image.key_pe)
            chunk_high_res = _chunk_of(features, start, PROMPT_CHUNK)
            parts.append(
                self._predict_chunk(
                    chunk_image, tokens[chunk], size, selected, min_iou, chunk_high_res, layout
                )
            )
        masks, iou_pred = zip(*parts, strict=True)
        masks, iou_pred = torch.cat(masks), torch.cat(iou_pred)[:, selected]
        if choose_single:
            return self.decoder.stable_single_or_best_multimask(masks, iou_pred)
        return masks, iou_pred

    def _predict_chunk(
        self,
        image: PreparedImage,
        tokens: torch.Tensor,
        size: torch.Size,
        mask_tokens: slice,
        min_iou: float | None,
        high_res: list[torch.Tensor] | None,
        layout: HighResLayout | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of the ``mask_tokens`` (B, M, 4h, 4w) and IoU predictions of all tokens
        (B, num_mask_tokens) for (B, N, C) tokens on an (h, w) = ``size`` grid."""
        decoder = self.decoder
        hs, src = fast.decode(
            decoder.transformer, image, tokens, 1 + decoder.num_mask_tokens, self.fold
        )
        iou_pred = decoder.iou_prediction_head(hs[:, 0, :])
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = self._hypernetworks(mask_tokens_out[:, mask_tokens], mask_tokens)
        wanted = None
        if min_iou is not None:
            wanted = (iou_pred[:, mask_tokens].float() > min_iou).any(dim=1).tolist()
        return self._masks(src, hyper_in, size, wanted, high_res, layout), iou_pred

    def _hypernetworks(self, tokens: torch.Tensor, selected: slice) -> torch.Tensor:
        """The ``selected`` hypernetwork MLPs on their mask tokens (B, M, C) -> (B, M, C / 8),
        as one batched product per layer (a third of the small products' time)."""
        x = tokens.transpose(0, 1)  # (M, B, C)
        for depth, (weight, bias) in enumerate(self.hypernetworks):
            x = torch.baddbmm(bias[selected], x, weight[selected])
            if depth < len(self.hypernetworks) - 1:
                x = F.relu(x)
        if self.decoder.output_hypernetworks_mlps[0].sigmoid_output:
            x = torch.sigmoid(x)
        return x.transpose(0, 1)

    def _masks(
        self,
        src: torch.Tensor,
        hyper_in: torch.Tensor,
        size: torch.Size,
        wanted: list[bool] | None,
        high_res: list[torch.Tensor] | None,
        layout: HighResLayout | None,
    ) -> torch.Tensor:
        """Mask logits (B, T, 4h, 4w) from transformer output (B, h * w, C) and the
        hypernetwork weights (B, T, C / 8), one prompt set at a time; the sets not
        ``wanted`` (default: all are) get -inf. ``high_res``: projected high-resolution
        features (batch 1 or B), added after each transposed convolution as in SAM 2;
        ``layout``: shared ones already in the passes' pixel layout.

        The output upscaling runs as matrix products: a 2x2 stride-2 transposed convolution
        maps each input pixel to a 2x2 block on its own, so it is a linear layer. Taken one
        kernel row at a time, its outputs for input pixel (y, x) are the pixels (2y + i,
        2x + j) of one output row, already in raster order; so each of the four (row, row)
        pairs of the two convolutions yields every fourth row of the masks directly, and
        only whole rows are interleaved at the end (a pixel-level shuffle of the masks
        cost more than the products on a CPU). One set's features (8 MB in float32) stay
        in cache through the passes over them.
        """
        _, norm, act1, _, act2 = self.decoder.output_upscaling
        height, width = size
        first_rows, second_rows = self.kernel_rows
        masks = []
        for index, (features, weights) in enumerate(zip(src, hyper_in, strict=True)):
            if wanted is not None and not wanted[index]:
                shape = (weights.shape[0], 4 * height, 4 * width)
                masks.append(features.new_full(shape, float("-inf")))
                continue
            set_layout = layout
            if high_res is not None and set_layout is None:
                set_layout = _kernel_row_layout(high_res, index)
            rows = []
            for i, (w1, b1) in enumerate(first_rows):
                x = F.linear(features, w1, b1).view(-1, w1.shape[0] // 2)  # pixels (y, x, j)
                if set_layout is not None:  # rows 2y + i of the 1/2-upscaled grid
                    x = x + set_layout[1][i]
                x = _activate(
                    act1, F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
                )
                for i2, (w2, b2) in enumerate(second_rows):
                    upscaled = F.linear(x, w2, b2).view(-1, w2.shape[0] // 2)
                    if set_layout is not None:  # rows 4y + 2i + i2 of the full-size grid
                        upscaled = upscaled + set_layout[0][2 * i + i2]
                    upscaled = _activate(act2, upscaled)
                    rows.append(F.linear(weights, upscaled).view(-1, height, 4 * width))
            # rows[2i + i2] holds mask rows 4y + 2i + i2.
            masks.append(torch.stack(rows, dim=2).view(-1, 4 * height, 4 * width))
        return torch.stack(masks)


def _stacked_hypernetworks(decoder: MaskDecoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of the hypernetwork MLPs: weights (M, in, out) and biases (M, 1, out)."""
    mlps = list(decoder.output_hypernetworks_mlps)
    return [
        (
            torch.stack([mlp.layers[depth].weight.mT for mlp in mlps]),
            torch.stack([mlp.layers[depth].bias for mlp in mlps]).unsqueeze(1),
        )
        for depth in range(len(mlps[0].layers))
    ]


def _chunk_of(
    features: list[torch.Tensor] | None, start: int, count: int
) -> list[torch.Tensor] | None:
    """Prompt sets ``start`` to ``start + count`` of per-set features (shared ones whole)."""
    if features is None:
        return None
    return [f if f.shape[0] == 1 else f[start : start + count] for f in features]


def _kernel_row_layout(
    features: list[torch.Tensor], index: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt set ``index``'s (fine, medium) high-resolution features in the pixel layout
    of the upscaling's kernel-row passes: fine rows 4y + p for p = 0..3, medium rows
    2y + i for i = 0, 1, each (pixels, C)."""
    fine, medium = (f[0] if f.shape[0] == 1 else f[index] for f in features)
    return (
        [_rows_as_pixels(fine, phase, 4) for phase in range(4)],
        [_rows_as_pixels(medium, phase, 2) for phase in range(2)],
    )


def _rows_as_pixels(features: torch.Tensor, phase: int, every: int) -> torch.Tensor:
    """Rows ``phase``, ``phase + every``, ... of (C, H, W) features as (pixels, C) in raster
    order: the pixel layout of one kernel-row pass of the upscaling."""
    return features[:, phase::every].permute(1, 2, 0).reshape(-1, features.shape[0])


def _activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)``; a float32 GELU runs in place when no gradient needs ``x``
    (measured 20% faster for the upscaling on a CPU; bfloat16's in-place kernel was
    slower than the out-of-place one)."""
    in_place = x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
    if in_place and type(activation) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


def _kernel_rows(
    conv: nn.ConvTranspose2d,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """A 2x2 stride-2 transposed convolution as two linear layers, one per kernel row i:
    weight (2 * out, in) and bias, outputs ordered (j, out channel) for kernel column j."""
    bias = None if conv.bias is None else conv.bias.repeat(2)
    # (in, out, i, j) -> for each i: (j, out, in)
    return [(conv.weight[:, :, i].permute(2, 1, 0).flatten(0, 1), bias) for i in range(2)]

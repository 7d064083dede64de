"""The Segment Anything model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM. ``image_encoder`` maps (B, 3, S, S) to (B, 256, S/16, S/16) and has ``img_size``."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, ...] = PIXEL_MEAN,
        pixel_std: tuple[float, ...] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return int(self.image_encoder.img_size)

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Official-style end-to-end call.

        Each record has ``image`` (3, H, W) resized so the long side is ``image_size``,
        ``original_size`` (H0, W0), and optionally ``point_coords`` (B, N, 2),
        ``point_labels`` (B, N), ``boxes`` (B, 4), ``mask_inputs`` (B, 1, 256, 256),
        all in the resized frame.
        Returns per record ``masks`` (B, C, H0, W0) bool, ``iou_predictions`` (B, C),
        ``low_res_logits`` (B, C, 256, 256).
        """
        images = torch.stack([self.preprocess(r["image"]) for r in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res,
                input_size=record["image"].shape[-2:],
                original_size=record["original_size"],
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Low-res logits (B, C, h, w) -> logits (B, C, H0, W0) in the original image.

        ``input_size`` is the (H, W) of the resized image before padding.
        """
        return upscale_logits(
            masks, self.image_size, (int(input_size[0]), int(input_size[1])), original_size
        )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (…, 3, H, W) pixel values and pad bottom/right to ``image_size``."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))


def upscale_logits(
    low_res: torch.Tensor,
    model_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """SAM's mask post-processing, bit for bit, without computing the padding.

    SAM upscales (B, C, s, s) logits bilinearly to the padded (model_size, model_size) input,
    crops the (h, w) = ``input_size`` image part and resizes that to ``original_size``. Each
    bilinear output pixel depends only on its two nearest source rows/columns, so upscaling
    just the source rows/columns the image part needs (plus one) by the same integer factor
    gives exactly the same numbers for less work when the image is not square.

    Returns:
        (B, C, H, W) logits, H, W = ``original_size``.
    """
    side = low_res.shape[-1]
    factor = model_size // side
    if low_res.shape[-2] == side and factor * side == model_size:
        rows = min(side, math.ceil(input_size[0] / factor) + 1)
        cols = min(side, math.ceil(input_size[1] / factor) + 1)
        # A contiguous copy of the (small) slice: interpolating a strided view is ~30% slower.
        padded = F.interpolate(
            low_res[..., :rows, :cols].contiguous(),
            (rows * factor, cols * factor),
            mode="bilinear",
            align_corners=False,
        )
    else:  # not SAM's layout: upscale everything
        padded = F.interpolate(
            low_res, (model_size, model_size), mode="bilinear", align_corners=False
        )
    image_part = padded[..., : input_size[0], : input_size[1]]
    return F.interpolate(image_part, tuple(original_size), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=64)
def _resize_taps(
    source: int, factor: int, crop: int, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of SAM's post-processing as a banded linear map from ``source`` samples:
    upscale by ``factor``, keep the first ``crop``, resize to ``target`` (all bilinear,
    ``align_corners=False``).

    Returns (target, taps) source indices and (target, taps) weights; every output sample
    is ``sum(weight * source[index])`` over at most a few neighbouring source samples.
    """
    # The map's matrix, from the same interpolations applied to each source basis vector.
    # Float32, as the interpolations compute their weights; the products are exact enough.
    basis = torch.eye(source).unsqueeze(0)
    upscaled = F.interpolate(basis, source * factor, mode="linear", align_corners=False)
    matrix = F.interpolate(upscaled[..., :crop], target, mode="linear", align_corners=False)
    matrix = matrix[0].T  # (target, source)
    nonzero = matrix != 0
    first = nonzero.int().argmax(dim=1)
    last = source - 1 - nonzero.flip(1).int().argmax(dim=1)
    taps = int((last - first).max()) + 1
    wanted = first[:, None] + torch.arange(taps)
    index = wanted.clamp(max=source - 1)
    # Taps past the last sample are clamped onto it; zero weight keeps it counted once.
    return index, torch.where(wanted < source, matrix.gather(1, index), 0.0)


def upscale_logits_fast(
    low_res: torch.Tensor,
    model_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """:func:`upscale_logits` in one pass per axis, equal up to float rounding (~1e-7).

    The two bilinear resizes (to the padded model input, then from its image part to the
    original size) compose into one banded map per axis, so the (model_size)² intermediate
    is never made: 3-4x faster for photos up to the model's input size. Images larger
    than that take :func:`upscale_logits`, which is as fast there. The
    predictor uses it; the automatic mask generator keeps the bit-exact form, whose masks
    must equal the official generator's.

    Args:
        low_res: (B, C, s, s) logits, s = model_size / 4 for SAM.

    Returns:
        (B, C, H, W) logits, H, W = ``original_size``.
    """
    side = low_res.shape[-1]
    factor = model_size // side
    enlarging = original_size[0] * original_size[1] > input_size[0] * input_size[1]
    if low_res.shape[-2] != side or factor * side != model_size or enlarging:
        # Enlarging, the output dominates and one interpolation pass writes it fastest.
        return upscale_logits(low_res, model_size, input_size, original_size)
    rows, cols = (_resize_taps(side, factor, c, o) for c, o in zip(input_size, original_size))
    # Both passes gather whole rows (contiguous copies); the columns' pass works on the
    # transposed result of the rows' pass.
    x = _resize_rows(low_res[..., : int(rows[0].max()) + 1, :], *rows)
    x = _resize_rows(x[..., : int(cols[0].max()) + 1].mT.contiguous(), *cols)
    return x.mT.contiguous()


def _resize_rows(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., R, W) -> (..., O, W): output row o = sum_t weight[o, t] * x[..., index[o, t], :]."""
    index, weight = index.to(x.device), weight.to(x.device, x.dtype)
    out = x.index_select(-2, index[:, 0]) * weight[:, 0, None]
    for tap in range(1, index.shape[1]):
        out.addcmul_(x.index_select(-2, index[:, tap]), weight[:, tap, None])
    return out

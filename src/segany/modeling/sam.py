"""The Segment Anything model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

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
    """SAM. ``image_encoder`` maps (B, 3, S, S) to (B, 256, S/16, S/16) and has ``img_size``.

    When the mask decoder uses high-resolution features (``use_high_res_features``, as SAM
    2's does), the encoder also has ``forward_features`` returning its 1/4 and 1/8
    features; :meth:`encode_image` gives both, and every caller of the decoder passes them.
    """

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

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Preprocessed (B, 3, S, S) images -> (B, C, S/16, S/16) embeddings and, for a
        decoder with high-resolution features, those features projected for it
        ((B, C/8, S/4, S/4), (B, C/4, S/8, S/8)), else None."""
        if not self.mask_decoder.use_high_res_features:
            return self.image_encoder(images), None
        embeddings, features = self.image_encoder.forward_features(images)
        return embeddings, self.mask_decoder.project_high_res(features)

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
        embeddings, high_res = self.encode_image(images)
        outputs = []
        for index, (record, embedding) in enumerate(zip(batched_input, embeddings)):
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
                high_res_features=None
                if high_res is None
                else [f[index : index + 1] for f in high_res],
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
    batch, channels = low_res.shape[:2]
    if batch * channels > 1:
        # One mask at a time: the padded-size intermediate of one stays in cache; of 16 it
        # does not, and the whole runs ~2.5x slower on a CPU. Same numbers either way.
        planes = low_res.reshape(-1, 1, 1, *low_res.shape[-2:])
        upscaled = [upscale_logits(p, model_size, input_size, original_size) for p in planes]
        return torch.cat(upscaled).view(batch, channels, *original_size)
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

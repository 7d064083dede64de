"""A small conv + attention image encoder for CPUs (segany's ``default`` model).

Input (B, 3, S, S) normalised image; output (B, out_chans, S/16, S/16) embedding,
the contract of SAM's image encoders, so SAM's prompt encoder and mask decoder
work unchanged on top of it.

Design (chosen by measured latency on 2 CPU cores, see benchmarks/): a stride-4
conv stem, inverted-residual (MBConv) stages at 1/4, 1/8 and 1/16 of the input,
where most of the pixels are and convolutions are cheapest, then a few global
self-attention blocks at 1/16 for image-wide context, and SAM's conv neck.
Batch norms are folded into the convolutions for inference by :func:`fuse_batch_norms`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConvNormAct, DropPath, MLPBlock, sam_neck


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project, plus the input."""

    def __init__(self, chans: int, expand: float = 2.0, kernel: int = 3) -> None:
        super().__init__()
        hidden = int(chans * expand)
        self.expand = ConvNormAct(chans, hidden)
        self.depthwise = ConvNormAct(hidden, hidden, kernel, groups=hidden)
        self.project = ConvNormAct(hidden, chans, act=None)
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.project(self.depthwise(self.expand(x))))


class AttentionBlock(nn.Module):
    """Pre-norm global self-attention + MLP over a (B, C, H, W) grid."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(self.norm1(tokens)).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, dim)
        tokens = tokens + self.drop_path(self.proj(attended))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens.transpose(1, 2).reshape(batch, dim, height, width)


class HybridEncoder(nn.Module):
    """Conv stages to 1/16, global attention there, SAM's neck.

    Args:
        img_size: side of the square input (the embedding is img_size / 16).
        widths: channels at 1/4, 1/8 and 1/16.
        depths: MBConv blocks at 1/4, 1/8 and 1/16.
        attention_blocks: global attention blocks at 1/16.
        num_heads: heads of those blocks.
        out_chans: channels of the embedding.
    """

    def __init__(
        self,
        img_size: int = 512,
        widths: tuple[int, int, int] = (64, 128, 256),
        depths: tuple[int, int, int] = (1, 2, 4),
        attention_blocks: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
        expand: float = 2.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // 16
        self.stem = nn.Sequential(
            ConvNormAct(3, widths[0] // 2, 3, stride=2),
            ConvNormAct(widths[0] // 2, widths[0], 3, stride=2),
        )
        self.stages = nn.ModuleList()
        for index, (width, depth) in enumerate(zip(widths, depths)):
            blocks: list[nn.Module] = []
            if index > 0:
                blocks.append(ConvNormAct(widths[index - 1], width, 3, stride=2))
            blocks.extend(MBConv(width, expand) for _ in range(depth))
            self.stages.append(nn.Sequential(*blocks))
        self.pos_embed = nn.Parameter(torch.zeros(1, widths[-1], grid, grid))
        self.blocks = nn.ModuleList(
            AttentionBlock(widths[-1], num_heads, mlp_ratio) for _ in range(attention_blocks)
        )
        self.neck = sam_neck(widths[-1], out_chans)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x)


@torch.no_grad()
def fuse_batch_norms(module: nn.Module) -> nn.Module:
    """Fold every eval-mode Conv2d + BatchNorm2d pair into one biased Conv2d, in place.

    Outputs are unchanged up to float rounding; inference gets faster. Only for
    inference: the fused model no longer matches the training state dict.
    """
    for child in module.children():
        if isinstance(child, nn.Sequential) and len(child) >= 2:
            conv, norm = child[0], child[1]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and not norm.training
            ):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                fused = nn.Conv2d(
                    conv.in_channels,
                    conv.out_channels,
                    conv.kernel_size,
                    conv.stride,
                    conv.padding,
                    groups=conv.groups,
                    bias=True,
                )
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
                child[0], child[1] = fused, nn.Identity()
                continue
        fuse_batch_norms(child)
    return module

"""TinyViT image encoder, as used by MobileSAM (``vit_t``).

Input (B, 3, S, S) normalised image; output (B, 256, S/16, S/16) embedding.
Stages: a conv stem (stride 4), one MBConv stage, then three stages of windowed
attention with a learned relative-offset bias and a depthwise "local" conv.
Parameter names follow MobileSAM's so that ``mobile_sam.pt`` loads directly.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .common import DropPath, sam_neck


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (children ``c`` and ``bn``)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c",
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False),
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convs: (B, 3, S, S) -> (B, D, S/4, S/4)."""

    def __init__(self, in_chans: int, embed_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1),
            activation(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block on (B, C, H, W)."""

    def __init__(
        self, chans: int, expand_ratio: float, activation: type[nn.Module], drop_path: float
    ) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2dBN(chans, hidden)
        self.act1 = activation()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = activation()
        self.conv3 = Conv2dBN(hidden, chans, bn_weight_init=0.0)
        self.act3 = activation()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(x + self.drop_path(self.conv3(y)))


class PatchMerging(nn.Module):
    """Channel change and (optionally) 2x downsampling: (B, C, H, W) -> (B, C', H', W')."""

    def __init__(self, dim: int, out_dim: int, stride: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.act = activation()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class Mlp(nn.Module):
    """Pre-norm MLP on (..., C)."""

    def __init__(self, dim: int, hidden: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def offset_index(window: int) -> torch.Tensor:
    """(N, N) index of the |dy|, |dx| offset class of every token pair of a window.

    Classes are numbered in order of first appearance over row-major pairs, the
    layout of the learned ``attention_biases`` table.
    """
    cells = list(itertools.product(range(window), range(window)))
    classes: dict[tuple[int, int], int] = {}
    index = []
    for a in cells:
        for b in cells:
            offset = (abs(a[0] - b[0]), abs(a[1] - b[1]))
            index.append(classes.setdefault(offset, len(classes)))
    return torch.tensor(index).view(len(cells), len(cells))


class Attention(nn.Module):
    """Pre-norm window attention with a learned bias per head and relative offset."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index = offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, int(index.max()) + 1))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens of B windows -> (B, N, C)."""
        x = self.norm(x)
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.key_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TinyViTBlock(nn.Module):
    """Window attention, a depthwise 3x3 conv, then an MLP, on (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: float,
        local_conv_size: int,
        activation: type[nn.Module],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation)
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        self.drop_path = DropPath(drop_path)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        win = self.window_size
        pad_h, pad_w = (win - height % win) % win, (win - width % win) % win
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // win, (width + pad_w) // win
        windows = x.view(batch, rows, win, cols, win, dim).transpose(2, 3)
        windows = self.attn(windows.reshape(batch * rows * cols, win * win, dim))
        x = windows.view(batch, rows, cols, win, win, dim).transpose(2, 3)
        x = x.reshape(batch, rows * win, cols * win, dim)
        return x[:, :height, :width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._window_attention(x))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


class ConvLayer(nn.Module):
    """Stage of MBConv blocks, then an optional :class:`PatchMerging`; (B, C, H, W)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        activation: type[nn.Module],
        drop_path: list[float],
        downsample: PatchMerging | None,
        conv_expand_ratio: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConv(dim, conv_expand_ratio, activation, drop_path[i]) for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class BasicLayer(nn.Module):
    """Stage of :class:`TinyViTBlock`, then an optional :class:`PatchMerging`; (B, C, H, W)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: list[float],
        downsample: PatchMerging | None,
        local_conv_size: int,
        activation: type[nn.Module],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim, num_heads, window_size, mlp_ratio, drop_path[i], local_conv_size, activation
            )
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT backbone with SAM's neck.

    Args:
        img_size: side of the square input.
        embed_dims, depths, num_heads, window_sizes: per-stage sizes (4 stages).
        merge_strides: stride of the patch merging after stages 0..2; MobileSAM keeps
            the last stage at S/16 with stride (2, 2, 1).
        out_chans: channels of the output embedding.
        drop_path_rate: stochastic depth, rising linearly over blocks.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        merge_strides: tuple[int, ...] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        activation = nn.GELU
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], activation)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            block_rates = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            downsample = None
            if i < len(depths) - 1:
                downsample = PatchMerging(
                    embed_dims[i], embed_dims[i + 1], merge_strides[i], activation
                )
            if i == 0:
                layer: nn.Module = ConvLayer(
                    embed_dims[0], depth, activation, block_rates, downsample, mbconv_expand_ratio
                )
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    depth,
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    block_rates,
                    downsample,
                    local_conv_size,
                    activation,
                )
            self.layers.append(layer)
        self.neck = sam_neck(embed_dims[-1], out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)

"""SAM's ViT image encoder (ViT-B/L/H and custom sizes).

Input: (B, 3, S, S) normalised image, S = ``img_size`` (1024 for SAM).
Output: (B, out_chans, S/patch, S/patch) image embedding (256 x 64 x 64 for SAM).

Blocks use windowed attention except at ``global_attn_indexes``; every attention
adds MViTv2-style decomposed relative-position terms. Attention runs through
``scaled_dot_product_attention`` with the relative-position terms as an additive
bias, batched over heads and windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import DropPath, MLPBlock, sam_neck


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather relative-position embeddings for every (query, key) pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: (L, C) learned table; resized linearly when L != 2 * max(q, k) - 1.

    Returns:
        (q_size, k_size, C) embeddings.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    index = (q_coords - k_coords) + (k_size - 1) * k_scale
    return rel_pos[index.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias of decomposed relative positions (MViTv2).

    Args:
        q: (N, q_h * q_w, C) unscaled queries, N = batch * heads.
        rel_pos_h, rel_pos_w: (L, C) tables for the height and width axes.

    Returns:
        (N, q_h * q_w, k_h * k_w) bias to add to the attention logits.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    table_h = relative_position_table(q_h, k_h, rel_pos_h).to(q.dtype)
    table_w = relative_position_table(q_w, k_w, rel_pos_w).to(q.dtype)
    q = q.reshape(q.shape[0], q_h, q_w, q.shape[-1])
    bias_h = torch.einsum("nhwc,hkc->nhwk", q, table_h)
    bias_w = torch.einsum("nhwc,wkc->nhwk", q, table_w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]
    return bias.reshape(q.shape[0], q_h * q_w, k_h * k_w)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required with relative positions")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, tokens, head_dim)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(
                q.reshape(batch * self.num_heads, tokens, -1),
                self.rel_pos_h,
                self.rel_pos_w,
                (height, width),
                (height, width),
            ).reshape(batch, self.num_heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, height, width, dim)
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) into (B * nWindows, window, window, C), zero-padding H and W.

    Returns the windows and the padded size (Hp, Wp).
    """
    batch, height, width, channels = x.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: back to (B, H, W, C) without padding."""
    padded_h, padded_w = padded_hw
    height, width = hw
    batch = windows.shape[0] // ((padded_h // window) * (padded_w // window))
    x = windows.view(batch, padded_h // window, padded_w // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    if padded_h > height or padded_w > width:
        x = x[:, :height, :width, :].contiguous()
    return x


class Block(nn.Module):
    """Pre-norm transformer block with windowed (``window_size > 0``) or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size
        self.drop_path = DropPath(0.0)  # set by training code; a no-op at inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ImageEncoderViT(nn.Module):
    """ViT backbone with a conv neck, as in SAM.

    Args:
        img_size: side of the square, padded input image in pixels.
        patch_size: patch side; the embedding grid is img_size / patch_size.
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        out_chans: channels of the output embedding.
        window_size: attention window of the non-global blocks.
        global_attn_indexes: blocks that attend over the whole grid.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = sam_neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))

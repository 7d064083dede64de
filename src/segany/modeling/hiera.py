"""Hiera, SAM 2's image trunk: a hierarchical ViT with pooled attention.

Input: (B, 3, H, W) normalised image, H and W multiples of 32 (1024 x 1024 for SAM 2).
Output: one feature map per stage, finest first: (B, C_s, H / 4 / 2^s, W / 4 / 2^s) with
C_s = ``embed_dim`` * 2^s; for 1024 px the grids are 256², 128², 64² and 32².

A 7x7 stride-4 conv embeds patches; a learned position embedding is added once (a
"background" table resized to the token grid plus a window-sized table tiled over it). Each
stage after the first starts with a block that max-pools its queries 2x2, halving the grid
and doubling channels and heads. Blocks attend within windows except the global ones.

Same numbers and parameter names as Meta's ``sam2.modeling.backbones.hieradet.Hiera``
(sam2 1.1.0), so the ``image_encoder.trunk.*`` weights of SAM 2 checkpoints load unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import DropPath
from .image_encoder import (
    _attention_by_products,
    _attention_by_products_is_faster,
    window_partition,
    window_unpartition,
)

# Every stage transition pools queries by this stride (Meta's ``q_stride=(2, 2)``); the
# channels and heads double at the same place.
Q_STRIDE = 2
# Hiera's LayerNorms, like Meta's.
NORM_EPS = 1e-6


def max_pool_tokens(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Max-pool a (N, h, w, C) token grid to (N, h // stride, w // stride, C)."""
    pooled = F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride)
    return pooled.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: (B, 3, H, W) -> (B, H/4, W/4, D) by a 7x7 stride-4 conv."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class PooledAttention(nn.Module):
    """Multi-head attention over a (N, h, w, dim) grid whose queries may be max-pooled.

    With ``q_stride`` the output grid is (h // q_stride, w // q_stride): each pooled query
    still attends to every key of the full grid. Output channels are ``dim_out``. Meta's
    ``MultiScaleAttention``.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        # Each of q, k, v: (N, h * w, heads, head_dim).
        q, k, v = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).unbind(2)
        if self.q_stride:
            # Pool with the heads folded into channels: the grid is what shrinks.
            q = max_pool_tokens(q.reshape(batch, height, width, -1), self.q_stride)
            height, width = q.shape[1:3]
            q = q.reshape(batch, height * width, self.num_heads, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if _attention_by_products_is_faster(q):
            # bfloat16 on a CPU: the fused kernel is no faster there than in float32;
            # products over chunks of query rows measured 1.2-1.5x faster on every
            # window and grid size of Hiera (see ``image_encoder``).
            out = _attention_by_products(q, k, v, None, None, max_rows=q.shape[-2])
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear; children ``layers.0`` and ``layers.1`` as in Meta's weights."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)])
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.act(self.layers[0](x)))


class HieraBlock(nn.Module):
    """Pre-norm transformer block on (B, H, W, dim) -> (B, H', W', dim_out).

    ``window_size`` 0 means global attention. A block that changes the width (the first of
    a stage) projects its shortcut to ``dim_out``, and with ``q_stride`` pools both the
    shortcut and the queries, so H' = H // q_stride. Meta's ``MultiScaleBlock``.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        window_size: int,
        q_stride: int | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if q_stride and dim == dim_out:
            raise ValueError("a block that pools must also change the width (as in Hiera)")
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = PooledAttention(dim, dim_out, num_heads, q_stride)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim_out, eps=NORM_EPS)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        shortcut = x
        if self.proj is not None:
            # The widened shortcut is projected from the normalised input, as in Meta's.
            shortcut = self.proj(normed)
            if self.q_stride:
                shortcut = max_pool_tokens(shortcut, self.q_stride)
        x = shortcut + self.drop_path(self._attend(normed, out_hw=shortcut.shape[1:3]))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attend(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Attention over the whole grid or within windows; (B, H, W, C) -> (B, *out_hw, C')."""
        if self.window_size == 0:
            return self.attn(x)
        # Windows are zero-padded after the norm, so padded tokens take part as keys
        # (their keys and values are the qkv biases), exactly as in Meta's.
        windows, (padded_h, padded_w) = window_partition(x, self.window_size)
        windows = self.attn(windows)
        # Queries were pooled inside each window, so the smaller windows still tile the
        # pooled padded grid, which is cropped to the shortcut's size.
        stride = self.q_stride or 1
        padded_hw = (padded_h // stride, padded_w // stride)
        return window_unpartition(windows, self.window_size // stride, padded_hw, out_hw)


class BlockPlan(NamedTuple):
    """Where one block sits: its stage, its window (0: global) and whether it pools."""

    stage: int
    window: int
    pools: bool


def plan_blocks(
    stages: tuple[int, ...], window_spec: tuple[int, ...], global_att_blocks: tuple[int, ...]
) -> list[BlockPlan]:
    """The blocks of a Hiera, in order.

    The first block of each stage after the first pools, and it attends in the previous
    stage's window size: it still sees the previous stage's grid (Meta's window sizes "lag
    by a block").
    """
    plan = []
    for stage, depth in enumerate(stages):
        for index_in_stage in range(depth):
            pools = stage > 0 and index_in_stage == 0
            window = window_spec[stage - 1] if pools else window_spec[stage]
            if len(plan) in global_att_blocks:
                window = 0
            plan.append(BlockPlan(stage, window, pools))
    return plan


class Hiera(nn.Module):
    """Hiera trunk: (B, 3, H, W) image -> per-stage (B, C_s, H_s, W_s) features, finest first.

    Args:
        embed_dim: channels of the first stage; doubled at each later stage.
        num_heads: heads of the first stage; doubled at each later stage.
        stages: blocks per stage.
        global_att_blocks: indices (over all blocks) of the blocks with global attention.
        window_spec: window size per stage.
        window_pos_embed_bkg_spatial_size: (h, w) of the background position table.
        mlp_ratio: MLP hidden width over the block width.
        drop_path_rate: stochastic depth of the last block (rising linearly from 0).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        stages: tuple[int, ...],
        global_att_blocks: tuple[int, ...],
        window_spec: tuple[int, ...],
        window_pos_embed_bkg_spatial_size: tuple[int, int],
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(window_spec) != len(stages):
            raise ValueError(f"{len(stages)} stages but {len(window_spec)} window sizes")
        self.channels = tuple(embed_dim * 2**stage for stage in range(len(stages)))
        # Index of each stage's last block: where the features are taken.
        self.stage_ends = tuple(sum(stages[: stage + 1]) - 1 for stage in range(len(stages)))
        self.patch_embed = PatchEmbed(embed_dim)
        # Windowed absolute position embedding (Bolya et al., "Window Attention is Bugged").
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        window = window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window, window))

        plan = plan_blocks(stages, window_spec, global_att_blocks)
        # On the CPU even when built under ``torch.device("meta")``, which cannot list values.
        drop_rates = torch.linspace(0, drop_path_rate, len(plan), device="cpu").tolist()
        self.blocks = nn.ModuleList(
            HieraBlock(
                dim=self.channels[block.stage - 1] if block.pools else self.channels[block.stage],
                dim_out=self.channels[block.stage],
                num_heads=num_heads * 2**block.stage,
                window_size=block.window,
                q_stride=Q_STRIDE if block.pools else None,
                mlp_ratio=mlp_ratio,
                drop_path=rate,
            )
            for block, rate in zip(plan, drop_rates)
        )

    def position_embedding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(1, h, w, C) embedding for an (h, w) token grid.

        The background table is resized bicubically (align_corners=False, no antialias)
        to the grid, then the window table is tiled over it, so the grid must be a
        multiple of the window.
        """
        height, width = grid_hw
        window = self.pos_embed_window.shape[-1]
        if height % window or width % window:
            raise ValueError(
                f"Hiera needs image sides that are multiples of {4 * window} px; the token "
                f"grid {height}x{width} is not a multiple of its {window}x{window} window"
            )
        background = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        tiled = self.pos_embed_window.tile(1, 1, height // window, width // window)
        return (background + tiled).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1:3])
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.stage_ends:
                features.append(x.permute(0, 3, 1, 2))
        return features

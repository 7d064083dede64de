"""SAM's ViT image encoder (ViT-B/L/H and custom sizes).

Input: (B, 3, S, S) normalised image, S = ``img_size`` (1024 for SAM).
Output: (B, out_chans, S/patch, S/patch) image embedding (256 x 64 x 64 for SAM).

Blocks use windowed attention except at ``global_attn_indexes``; every attention
adds MViTv2-style decomposed relative-position terms. Attention runs through
``scaled_dot_product_attention`` with the relative-position terms as an additive
bias, batched over heads and windows; in reduced precision on a CPU, as explicit batched
products over chunks of query rows instead (:func:`rel_pos_attention`).
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


# Upper bound on the bytes of relative-position bias materialised at once. Global blocks
# attend over all (S/16)² tokens, so their full bias (heads x tokens² values) is a
# gigabyte for ViT-H; it is built and consumed in chunks of query rows instead.
ATTENTION_BIAS_BYTES = 64 * 2**20


def decomposed_rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of MViTv2's decomposed relative-position bias.

    The bias of query (y, x) towards key (ky, kx) is ``rel_h[..., (y, x), ky] +
    rel_w[..., (y, x), kx]``; :func:`expand_rel_pos_bias` turns rows of them into the bias.

    Args:
        q: (..., q_h * q_w, C) unscaled queries (any strides).
        rel_pos_h, rel_pos_w: (L, C) tables for the height and width axes.

    Returns:
        rel_h (..., q_h * q_w, k_h) and rel_w (..., q_h * q_w, k_w), contiguous.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    table_h = relative_position_table(q_h, k_h, rel_pos_h).to(q.dtype)
    table_w = relative_position_table(q_w, k_w, rel_pos_w).to(q.dtype)
    grid = q.unflatten(-2, (q_h, q_w))
    rel_h = torch.einsum("...hwc,hkc->...hwk", grid, table_h)
    rel_w = torch.einsum("...hwc,wkc->...hwk", grid, table_w)
    return rel_h.flatten(-3, -2).contiguous(), rel_w.flatten(-3, -2).contiguous()


def expand_rel_pos_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """Attention bias (..., Q, k_h * k_w) from rel_h (..., Q, k_h) and rel_w (..., Q, k_w)."""
    bias = rel_h.new_empty((*rel_h.shape, rel_w.shape[-1]))
    # Written straight into a contiguous buffer, so flattening the key axes is a view.
    torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=bias)
    return bias.flatten(-2)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    max_bias_bytes: int = ATTENTION_BIAS_BYTES,
) -> torch.Tensor:
    """Softmax attention plus a decomposed relative-position bias, in chunks of query rows.

    Args:
        q, k, v: (B, heads, H * W, C) queries, keys and values (any strides).
        rel_pos_h, rel_pos_w: (L, C) relative-position tables.
        size: (H, W) of the token grid (queries and keys alike).
        max_bias_bytes: bias bytes allowed at once; query rows are processed in chunks
            whose bias fits (one row at least).

    Returns:
        (B, heads, H * W, C): softmax(q k^T / sqrt(C) + bias) v.
    """
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, size, size)
    batch, heads, tokens, _ = q.shape
    rows = max(1, max_bias_bytes // (batch * heads * tokens * q.element_size()))
    if _attention_by_products_is_faster(q):
        return _attention_by_products(q, k, v, rel_h, rel_w, rows)
    if rows >= tokens:
        bias = expand_rel_pos_bias(rel_h, rel_w)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = q.new_empty((batch, heads, tokens, v.shape[-1]))
    for start in range(0, tokens, rows):
        part = slice(start, start + rows)
        bias = expand_rel_pos_bias(rel_h[:, :, part], rel_w[:, :, part])
        out[:, :, part] = F.scaled_dot_product_attention(q[:, :, part], k, v, attn_mask=bias)
    return out


# Query rows' scores kept at once by the explicit-products attention: small enough to
# stay in the CPU's caches between the product, the softmax and the product with values.
SCORE_CHUNK_BYTES = 16 * 2**20


def _attention_by_products_is_faster(q: torch.Tensor) -> bool:
    """Whether explicit batched products beat ``scaled_dot_product_attention`` here.

    Measured on CPU (2 cores, ViT-B embedding): with a bias, the fused CPU kernel reaches
    only ~90 GFLOP/s in bfloat16, and products make the whole embedding 1.4x faster; in
    float32 they tie, so float32 keeps the fused kernel. Under ``torch.compile`` too
    (compiled bfloat16 embedding 3.8 s with products, 5.1 s with the fused kernel);
    not for tracing (ONNX keeps one attention node); on GPUs the fused kernels win.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32 or torch.jit.is_tracing():
        return False
    return not (torch.is_grad_enabled() and q.requires_grad)


def _attention_by_products(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor | None,
    rel_w: torch.Tensor | None,
    max_rows: int,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(C) + bias) v as batched products over chunks of query rows.

    Args:
        q: (B, heads, N, C) queries; k, v: (B, heads, Nk, C) keys and values (any strides).
        rel_h, rel_w: (B, heads, N, k_h) and (B, heads, N, k_w) bias factors
            (:func:`decomposed_rel_pos_terms`), or None for no bias (Hiera's attention).
        max_rows: upper bound on the query rows of one chunk.

    Returns:
        (B, heads, N, C).
    """
    batch, heads, tokens, dim = q.shape
    keys = k.shape[-2]
    row_bytes = batch * heads * keys * q.element_size()
    rows = max(1, min(max_rows, SCORE_CHUNK_BYTES // row_bytes))
    scaled_q = (q * dim**-0.5).reshape(batch * heads, tokens, dim)
    # Contiguous (C, Nk) per head, or every product would copy the transposed keys again.
    keys_t = k.reshape(batch * heads, keys, dim).transpose(1, 2).contiguous()
    values = v.reshape(batch * heads, keys, -1)
    bias = None if rel_h is None or rel_w is None else (rel_h.flatten(0, 1), rel_w.flatten(0, 1))
    out = q.new_empty((batch * heads, tokens, values.shape[-1]))
    for start in range(0, tokens, rows):
        part = slice(start, start + rows)
        if bias is None:
            scores = torch.bmm(scaled_q[:, part], keys_t)
        else:
            scores = expand_rel_pos_bias(bias[0][:, part], bias[1][:, part])
            scores.baddbmm_(scaled_q[:, part], keys_t)
        torch.bmm(scores.softmax(-1), values, out=out[:, part])
    return out.view(batch, heads, tokens, -1)


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
        self.max_bias_bytes = ATTENTION_BIAS_BYTES
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required with relative positions")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, dim = x.shape
        tokens = height * width
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, tokens, head_dim), strided views
        if self.use_rel_pos:
            out = rel_pos_attention(
                q, k, v, self.rel_pos_h, self.rel_pos_w, (height, width), self.max_bias_bytes
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v)
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

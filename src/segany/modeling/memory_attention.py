"""SAM 2's memory attention: the current frame's features attend to the memory bank.

The video model conditions a frame on its past before decoding it: the frame's 1/16
features (B, HW, C) go through layers of self-attention, cross-attention to the memory
and an MLP, each pre-norm with a residual. The memory is the concatenation (B, M, C_mem)
of the encoded past frames (each HW tokens, from :mod:`.memory_encoder`) followed by the
object pointers (each C-dim pointer split into C / C_mem tokens).

Both attentions rotate queries and keys by a 2-D rotary position encoding (RoPE) of the
token's grid cell: half of each head's channel pairs turn with the column, half with the
row. In the cross-attention the keys of every memory frame get the same rotations as the
queries (``rope_k_repeat``), and the object-pointer tokens at the end of the memory, which
have no grid cell, get none (``num_obj_ptr_tokens``).

Same numbers and parameter names as Meta's ``sam2.modeling.memory_attention`` (sam2
1.1.0): a checkpoint's ``memory_attention.*`` weights load with ``strict=True``. Unlike
Meta's module, this one takes and returns batch-first tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class MemoryAttentionConfig:
    """The memory attention of every official SAM 2 and 2.1 model (yaml
    ``model.memory_attention``; its width is the model's ``embed_dim`` and the memory's
    width its ``mem_dim``, given by :class:`~.sam2.Sam2Config`).

    Attributes:
        num_layers: :class:`MemoryAttentionLayer` count.
        num_heads: heads of both attentions.
        dim_feedforward: hidden width of each layer's MLP.
        activation: the MLP's activation, ``relu`` or ``gelu``.
        dropout: dropout of the attentions and the residual branches (training only).
        rope_theta: base of the rotary encoding's frequencies.
        pos_enc_at_input: add 0.1 x the position encoding to the features once, at input.
        pos_enc_at_attn: add it to the self-attention's queries and keys in every layer.
        pos_enc_at_cross_attn_queries, pos_enc_at_cross_attn_keys: add the frame's position
            encoding to the cross-attention queries, the memory's to its keys.
    """

    num_layers: int = 4
    num_heads: int = 1
    dim_feedforward: int = 2048
    activation: str = "relu"
    dropout: float = 0.1
    rope_theta: float = 10000.0
    pos_enc_at_input: bool = True
    pos_enc_at_attn: bool = False
    pos_enc_at_cross_attn_queries: bool = False
    pos_enc_at_cross_attn_keys: bool = True


def square_side(tokens: int) -> int:
    """Side of the square grid of ``tokens`` cells; the rotary encoding needs one."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"RoPE needs a square grid of tokens, not {tokens} tokens")
    return side


def axial_rope_angles(
    side: int, head_dim: int, theta: float = 10000.0, device: torch.device | None = None
) -> torch.Tensor:
    """Rotation angles (side², head_dim / 2) of a side x side grid, row-major tokens.

    Channel pair j of a head turns by ``position * theta ** (-4j' / head_dim)``: the first
    head_dim / 4 pairs (j' = j) with the token's column, the others (j' = j - head_dim / 4)
    with its row. Computed in float32, as Meta does.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, not {head_dim}")
    exponents = torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim
    rates = 1.0 / theta**exponents
    index = torch.arange(side * side, dtype=torch.float32, device=device)
    columns, rows = index % side, torch.div(index, side, rounding_mode="floor")
    return torch.cat((torch.outer(columns, rates), torch.outer(rows, rates)), dim=-1)


def rotations(angles: torch.Tensor) -> torch.Tensor:
    """(N, D / 2) angles -> the unit complex numbers that turn by them, (N, D / 2)."""
    return torch.polar(torch.ones_like(angles), angles)


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2j, 2j + 1) of (..., N, D) ``x``, read as the complex
    number x_2j + i x_2j+1, by multiplying it with its (N, D / 2) ``rotation``; computed in
    float32, returned in ``x``'s dtype. (The complex product is one fused kernel; the
    real-valued form, (a cos - b sin, a sin + b cos), takes several passes.)"""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class RoPEAttention(nn.Module):
    """Multi-head attention with a 2-D rotary position encoding of queries and keys.

    The queries are the tokens of a square grid (row-major); the keys are ``repeat`` such
    grids (``rope_k_repeat``: memory frames, each rotated as the queries are; otherwise
    exactly the queries' grid) followed by ``num_k_exclude_rope`` tokens left unrotated.
    Parameter names as Meta's ``RoPEAttention``.

    Args:
        embedding_dim: channels of the queries (and the output).
        num_heads: attention heads.
        kv_in_dim: channels of keys and values (default: ``embedding_dim``).
        rope_theta: base of the rotation frequencies.
        rope_k_repeat: keys may hold several grids (cross-attention to memory frames).
        dropout: attention dropout while training.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim")
        kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self.dropout_p = dropout
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0
    ) -> torch.Tensor:
        """q: (B, N, C) on a square grid; k, v: (B, Nk, C_kv) -> (B, N, C)."""
        q = self.split_heads(self.q_proj(q))
        k = self.split_heads(self.k_proj(k))
        v = self.split_heads(self.v_proj(v))
        side = square_side(q.shape[-2])
        angles = axial_rope_angles(side, self.head_dim, self.rope_theta, q.device)
        q = rotate_pairs(q, rotations(angles))
        k = self.rotate_keys(k, angles, num_k_exclude_rope)
        dropout_p = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def rotate_keys(
        self, k: torch.Tensor, angles: torch.Tensor, num_k_exclude_rope: int
    ) -> torch.Tensor:
        """Rotate the first ``Nk - num_k_exclude_rope`` keys (B, heads, Nk, d) as whole
        copies of the queries' grid (``angles``, one copy per memory frame); the rest stay
        as they are."""
        grid_keys = k.shape[-2] - num_k_exclude_rope
        if grid_keys == 0:
            return k
        repeat, leftover = divmod(grid_keys, angles.shape[0])
        if leftover or (repeat != 1 and not self.rope_k_repeat):
            expected = "whole grids" if self.rope_k_repeat else "one grid"
            raise ValueError(
                f"{grid_keys} rotated keys are not {expected} of {angles.shape[0]} tokens"
            )
        rotated = rotate_pairs(k[..., :grid_keys, :], rotations(angles.repeat(repeat, 1)))
        return torch.cat((rotated, k[..., grid_keys:, :]), dim=-2)


class MemoryAttentionLayer(nn.Module):
    """Self-attention, cross-attention to the memory, MLP; each pre-norm with a residual.

    Args:
        d_model: channels C of the frame's tokens.
        kv_in_dim: channels of the memory.
        config: the layer's options (:class:`MemoryAttentionConfig`).
    """

    def __init__(self, d_model: int, kv_in_dim: int, config: MemoryAttentionConfig) -> None:
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise ValueError(f"activation should be relu or gelu, not {config.activation!r}")
        heads, theta, dropout = config.num_heads, config.rope_theta, config.dropout
        self.self_attn = RoPEAttention(d_model, heads, rope_theta=theta, dropout=dropout)
        self.cross_attn_image = RoPEAttention(
            d_model, heads, kv_in_dim, rope_theta=theta, rope_k_repeat=True, dropout=dropout
        )
        self.linear1 = nn.Linear(d_model, config.dim_feedforward)
        self.linear2 = nn.Linear(config.dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[config.activation]
        self.pos_enc_at_attn = config.pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = config.pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = config.pos_enc_at_cross_attn_keys

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        """tgt, query_pos: (B, HW, C); memory, pos: (B, M, C_mem) -> (B, HW, C)."""
        x = self.norm1(tgt)
        qk = x + query_pos if self.pos_enc_at_attn else x
        tgt = tgt + self.dropout(self.self_attn(qk, qk, x))

        x = self.norm2(tgt)
        q = x + query_pos if self.pos_enc_at_cross_attn_queries else x
        k = memory + pos if self.pos_enc_at_cross_attn_keys else memory
        tgt = tgt + self.dropout(self.cross_attn_image(q, k, memory, num_k_exclude_rope))

        x = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout(x)


class MemoryAttention(nn.Module):
    """The current frame's tokens conditioned on the memory bank (see the module docstring).

    Args:
        d_model: channels C of the frame's tokens (the image embedding's, 256).
        kv_in_dim: channels of the memory tokens (the memory encoder's output, 64).
        config: layer count and options.
    """

    def __init__(
        self, d_model: int, kv_in_dim: int, config: MemoryAttentionConfig | None = None
    ) -> None:
        super().__init__()
        config = MemoryAttentionConfig() if config is None else config
        self.d_model = d_model
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, kv_in_dim, config) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = config.pos_enc_at_input

    def forward(
        self,
        curr: torch.Tensor,
        curr_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """Condition a frame on its memory.

        Args:
            curr: (B, HW, C) the frame's 1/16 features, row-major over a square grid.
            curr_pos: (B, HW, C) their sine position encoding.
            memory: (B, M, C_mem) the memory frames' tokens (each HW, same grid) followed
                by ``num_obj_ptr_tokens`` object-pointer tokens.
            memory_pos: (B, M, C_mem) the memory's position encodings.
            num_obj_ptr_tokens: the pointer tokens at the end of the memory (no RoPE).

        Returns:
            (B, HW, C), the conditioned features (final LayerNorm applied).
        """
        if curr.shape[0] != memory.shape[0]:
            raise ValueError(f"batch {curr.shape[0]} of the frame != {memory.shape[0]} of memory")
        output = curr + 0.1 * curr_pos if self.pos_enc_at_input else curr
        for layer in self.layers:
            output = layer(output, memory, memory_pos, curr_pos, num_obj_ptr_tokens)
        return self.norm(output)

"""SAM 2's memory attention for inference: what :mod:`segany.modeling.memory_attention`
computes, in exact faster forms.

The cross-attention of a frame's h * w tokens (C = 256 wide, one head) to its memory
(up to 7 frames of h * w tokens, C_mem = 64 wide, plus object-pointer tokens) is most of
a tracking step: at 1024 px, 4096 queries against ~29k keys in each of 4 layers.

In float32 the module's own form (``scaled_dot_product_attention``'s fused kernel) measured
fastest on a CPU, and only the rotations are made once. In bfloat16 two exact rewrites
pay:

* **Values stay C_mem wide.** ``W_o (sum_j p_j (W_v x_j + b_v)) + b_o`` equals
  ``(W_o W_v) (sum_j p_j x_j) + (W_o b_v + b_o)`` since each head's weights ``p_j`` sum to
  1: the weighted sum runs over 64-wide memory tokens instead of 256-wide values, a
  quarter of the products (where ``heads * C_mem < C``: the cross-attention).
* **Explicit products in row chunks.** The scores of a chunk of queries against all keys
  are one bfloat16 matrix product, the softmax one pass, the weighted sum another
  product: on an AMD EPYC (AVX512-BF16, 2 cores) the cross-attention of 4096 queries to
  7 memory frames took 0.86 s this way against 1.44 s for the fused kernel in bfloat16
  and 1.34 s in float32. Chunks keep the scores within :data:`SCORE_BYTES`.

On a CPU in ``bf16`` the whole memory attention runs as a bfloat16 copy (weights and
activations, autocast off; as the mask decoder's copy), which removes autocast's casts of
every layer's inputs. The memory attention of 4096 queries with 4 memory frames and 16
pointer tokens, measured in one process on an AMD EPYC (AVX512-BF16, 2 threads, beside a
training job, best of 3): module 6.74 s in float32, 7.04 s under bfloat16 autocast; this
form 6.47 s in float32, 4.78 s under autocast, 4.17 s as the bfloat16 copy (relative
error 6.6e-3 against float32, autocast's 1.7e-3).

The rotary encoding's unit complex numbers depend only on the grid and the head width:
one table per size is kept in :class:`FastMemoryAttention` (made again with it when the
weights change), and each memory frame's keys broadcast it.

The keys are rotated after their projection, as in the module (RoPE does not commute
with folding the key projection into the queries). Results equal the module's within
float rounding (``tests/test_sam2_speed.py``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..modeling.memory_attention import (
    MemoryAttention,
    MemoryAttentionLayer,
    RoPEAttention,
    axial_rope_angles,
    rotate_pairs,
    rotations,
    square_side,
)

# Bytes of one chunk of attention scores (queries x keys): 4096 bfloat16 queries against
# 7 memory frames go in chunks of ~1170 rows (larger chunks measured faster; the fused
# kernel needs none of this memory, but a frame's features are 4 MB each).
SCORE_BYTES = 64 * 2**20


class _FoldedValues:
    """One attention's value and output projections merged: (heads, C, C_kv) per head
    ``W_o,h W_v,h`` and the bias ``W_o b_v + b_o`` (see the module docstring)."""

    def __init__(self, attention: RoPEAttention, dtype: torch.dtype) -> None:
        heads, head_dim = attention.num_heads, attention.head_dim
        v_weight = attention.v_proj.weight.view(heads, head_dim, -1)  # (heads, d, C_kv)
        o_weight = attention.out_proj.weight.view(-1, heads, head_dim).transpose(0, 1)
        weight = torch.matmul(o_weight, v_weight).transpose(0, 1).flatten(1)  # (C, h*C_kv)
        bias = attention.out_proj(attention.v_proj.bias.unsqueeze(0)).squeeze(0)
        # Merged in float32, then rounded once.
        self.weight, self.bias = weight.to(dtype), bias.to(dtype)


def folds_values(attention: RoPEAttention) -> bool:
    """Whether attending over the unprojected values is cheaper: heads * C_kv < C."""
    kv_in = attention.v_proj.in_features
    return attention.num_heads * kv_in < attention.out_proj.out_features


class FastMemoryAttention:
    """A :class:`MemoryAttention` prepared for inference (see the module docstring).

    Args:
        module: the memory attention (eval mode); read, not changed. Made again when its
            weights change (:class:`~segany.inference.model.InferenceModel` does so).
        dtype: run in this dtype throughout (a copy of the weights in it, inputs cast
            once, autocast off, the result float32), as the mask decoder's bfloat16 copy
            on a CPU (see the module docstring). None: in the module's dtype, or under
            the caller's autocast.
        fused: the attentions' form: None by dtype (the fused kernel in float32, chunked
            products with folded values otherwise); True/False forced (tests).
    """

    def __init__(
        self,
        module: MemoryAttention,
        dtype: torch.dtype | None = None,
        fused: bool | None = None,
    ) -> None:
        self.dtype = dtype
        self.fused = fused
        self.module = module
        if dtype is not None:
            self.module = copy.deepcopy(module).to(dtype).eval().requires_grad_(False)
        weight_dtype = module.norm.weight.dtype if dtype is None else dtype
        with torch.no_grad():
            self.folded = {
                id(run): _FoldedValues(attention, weight_dtype)
                for layer, run_layer in zip(module.layers, self.module.layers, strict=True)
                for attention, run in (
                    (layer.self_attn, run_layer.self_attn),
                    (layer.cross_attn_image, run_layer.cross_attn_image),
                )
                if folds_values(attention)
            }
        self._rotations: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def rotations(
        self, side: int, head_dim: int, theta: float, device: torch.device
    ) -> torch.Tensor:
        """(side², head_dim / 2) complex rotations of a side x side grid (made once per
        size; memory frames' keys broadcast them, so one table serves any bank)."""
        key = (side, head_dim, device)
        found = self._rotations.get(key)
        if found is None:
            found = rotations(axial_rope_angles(side, head_dim, theta, device))
            self._rotations[key] = found
        return found

    def __call__(
        self,
        curr: torch.Tensor,
        curr_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """As :meth:`MemoryAttention.forward`: (B, HW, C) frame tokens and their position
        encoding, (B, M, C_mem) memory tokens and theirs -> (B, HW, C) (float32 when
        run in :attr:`dtype`)."""
        if curr.shape[0] != memory.shape[0]:
            raise ValueError(f"batch {curr.shape[0]} of the frame != {memory.shape[0]} of memory")
        if self.dtype is not None:
            inputs = (t.to(self.dtype) for t in (curr, curr_pos, memory, memory_pos))
            with torch.autocast(curr.device.type, enabled=False):
                return self._forward(*inputs, num_obj_ptr_tokens).float()
        return self._forward(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens)

    def _forward(
        self,
        curr: torch.Tensor,
        curr_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int,
    ) -> torch.Tensor:
        module = self.module
        output = curr + 0.1 * curr_pos if module.pos_enc_at_input else curr
        for layer in module.layers:
            output = self._layer(layer, output, memory, memory_pos, curr_pos, num_obj_ptr_tokens)
        return module.norm(output)

    def _layer(
        self,
        layer: MemoryAttentionLayer,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        num_k_exclude_rope: int,
    ) -> torch.Tensor:
        """:meth:`MemoryAttentionLayer.forward` in eval mode (no dropout)."""
        x = layer.norm1(tgt)
        qk = x + query_pos if layer.pos_enc_at_attn else x
        tgt = tgt + self._attend(layer.self_attn, qk, qk, x)
        x = layer.norm2(tgt)
        q = x + query_pos if layer.pos_enc_at_cross_attn_queries else x
        k = memory + pos if layer.pos_enc_at_cross_attn_keys else memory
        tgt = tgt + self._attend(layer.cross_attn_image, q, k, memory, num_k_exclude_rope)
        return tgt + layer.linear2(layer.activation(layer.linear1(layer.norm3(tgt))))

    def _attend(
        self,
        attention: RoPEAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        """:meth:`RoPEAttention.forward`: q (B, N, C) on a square grid, k and v (B, Nk,
        C_kv) -> (B, N, C)."""
        side = square_side(q.shape[1])
        q = attention.split_heads(attention.q_proj(q))
        k = attention.split_heads(attention.k_proj(k))
        queries = q.shape[-2]
        turns = self.rotations(side, attention.head_dim, attention.rope_theta, q.device)
        q = rotate_pairs(q, turns)
        grid_keys = k.shape[-2] - num_k_exclude_rope
        if grid_keys:
            repeat, leftover = divmod(grid_keys, queries)
            if leftover or (repeat != 1 and not attention.rope_k_repeat):
                angles = axial_rope_angles(side, attention.head_dim, attention.rope_theta)
                attention.rotate_keys(k, angles, num_k_exclude_rope)  # raises, as the module
            # (..., repeat, grid, d): each memory frame turned as the queries are.
            frames = k[..., :grid_keys, :].unflatten(-2, (repeat, queries))
            rotated = rotate_pairs(frames, turns).flatten(-3, -2)
            k = torch.cat((rotated, k[..., grid_keys:, :]), dim=-2)
        if q.dtype == torch.float32 if self.fused is None else self.fused:
            # The fused kernel measured fastest in float32 (the module's form).
            out = F.scaled_dot_product_attention(q, k, attention.split_heads(attention.v_proj(v)))
            return attention.out_proj(out.transpose(1, 2).flatten(2))
        folded = self.folded.get(id(attention))
        if folded is None:
            out = attend_in_chunks(q, k, attention.split_heads(attention.v_proj(v)))
            return attention.out_proj(out.transpose(1, 2).flatten(2))
        # Every head reads the same unprojected values: (B, 1, Nk, C_kv).
        out = attend_in_chunks(q, k, v.to(q.dtype).unsqueeze(1))  # (B, heads, N, C_kv)
        return F.linear(out.transpose(1, 2).flatten(2), folded.weight, folded.bias)


def attend_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, H, N, d) queries over (B, H, Nk, d) keys and (B, H or 1,
    Nk, d_v) values -> (B, H, N, d_v), as explicit products over chunks of query rows
    (see the module docstring); scale 1 / sqrt(d), as ``scaled_dot_product_attention``."""
    batch, heads, count, dim = q.shape
    keys = k.shape[-2]
    rows = max(1, SCORE_BYTES // (q.element_size() * batch * heads * keys))
    q = q * dim**-0.5
    k_t = k.transpose(-1, -2).contiguous()  # else each chunk's product copies it
    chunks = []
    for start in range(0, count, rows):
        scores = torch.matmul(q[..., start : start + rows, :], k_t)
        chunks.append(torch.matmul(scores.softmax(dim=-1), v))
    return torch.cat(chunks, dim=-2)

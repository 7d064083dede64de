"""SAM's cross attentions in exact faster forms, for decoding many prompts on one image.

Functions of a :class:`~segany.modeling.transformer.Attention` module that compute what
its ``forward`` computes, choosing by a count of multiply-adds between two exact forms.
With ``W_h`` the rows of a projection that make head h and ``s`` the softmax scale:

* a score ``s (W_q,h a + b_q,h) . (W_k,h x + b_k,h)`` equals
  ``(s W_k,h^T (W_q,h a + b_q,h)) . x`` plus a term constant over x, so projecting the
  few token-side vectors back to the model width replaces projecting every image token
  (the constant drops out of a softmax over image tokens, and is kept otherwise);
* an output ``W_o (sum_j p_j (W_v x_j + b_v))`` with ``sum_j p_j = 1`` per head
  equals ``sum_h W_o,h W_v,h (sum_j p_h,j x_j) + W_o b_v``, and for image queries over
  token values ``sum_h sum_t p_h,t (W_o,h v_h,t)``: one product with pre-projected
  token values instead of an inner-width output projection per image token.

Image-side tensors may have batch 1 while the tokens have batch B (one image shared by
B prompt sets): the shared side is then projected once, or read as one large product.
``fold`` arguments: None lets the cost model choose, True/False forces a form (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.transformer import Attention


def head_weight(attention: Attention, linear: nn.Linear) -> torch.Tensor:
    """A projection's weight per head: (heads, head_dim, embedding_dim)."""
    return linear.weight.view(attention.num_heads, attention.head_dim, attention.embedding_dim)


# -- cost model: multiply-adds per image token of each exact form -----------------------


def fold_image_projection(
    attention: Attention, batch: int, image_batch: int, tokens: int, fold: bool | None = None
) -> bool:
    """Whether folding one image-side projection into the token side is cheaper."""
    if fold is not None:
        return fold
    head_tokens = attention.num_heads * tokens
    projected = image_batch * attention.embedding_dim * attention.internal_dim
    projected += batch * head_tokens * attention.head_dim
    return batch * head_tokens * attention.embedding_dim < projected


def fold_output_projection(attention: Attention, tokens: int, fold: bool | None = None) -> bool:
    """Whether image-query outputs are cheaper from pre-projected token values."""
    if fold is not None:
        return fold
    head_tokens = attention.num_heads * tokens
    plain = head_tokens * attention.head_dim + attention.internal_dim * attention.embedding_dim
    return head_tokens * attention.embedding_dim < plain


# -- projections of the image side made once for many decodes -------------------------


def project_keys(
    attention: Attention, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image keys and values (1, N, C) through the key and value projections, per head:
    keys transposed (1, heads, head_dim, N) and values (1, heads, N, head_dim), both
    contiguous, as the products of ``token_to_image(projected=)`` read them."""
    keys_t = attention.split_heads(attention.k_proj(k)).mT.contiguous()
    return keys_t, attention.split_heads(attention.v_proj(v)).contiguous()


def project_queries(attention: Attention, q: torch.Tensor) -> torch.Tensor:
    """Image queries (1, N, C) through the query projection, per head and transposed:
    (1, heads, head_dim, N) contiguous, for ``image_to_token(projected_q=)``."""
    return attention.split_heads(attention.q_proj(q)).mT.contiguous()


def positional_term(attention: Attention, pe: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
    """A (1, N, C) positional encoding through ``projection``'s weight (no bias), per
    head and transposed: (heads, head_dim, N). Added to the projected image side, it
    stands for adding the encoding before projecting, which would cost a pass over
    the image side of every prompt set."""
    return attention.split_heads(F.linear(pe, projection.weight))[0].mT.contiguous()


# -- token-to-image ----------------------------------------------------------------------


def token_to_image(
    attention: Attention,
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    projected: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_pe_term: torch.Tensor | None = None,
    fold: bool | None = None,
) -> torch.Tensor:
    """Tokens attending to the image: ``attention(q, k, v)`` with a shareable image side.

    Args:
        q: (B, T, C) tokens.
        k, v: (1 or B, N, C) image keys and values; batch 1 is shared by the B token sets.
            Not read when ``projected`` is given.
        projected: a batch-1 ``k`` and ``v`` already through the projections, from
            :func:`project_keys`.
        key_pe_term: the keys' positional encoding through the key projection, from
            :func:`positional_term`; then ``k`` is given without the encoding.

    Returns:
        (B, T, C).
    """
    batch, tokens, _ = q.shape
    q = attention.split_heads(attention.q_proj(q))  # (B, heads, T, head_dim)
    if projected is not None:
        keys_t, values = projected
        scores = _per_head_product(q * attention.head_dim**-0.5, keys_t[0])
        out = _per_head_product(scores.softmax(dim=-1), values[0])
    elif fold_image_projection(attention, batch, k.shape[0], tokens, fold):
        out = _token_to_image_folded(attention, q, k, v, key_pe_term)
    else:
        keys = attention.split_heads(attention.k_proj(k))
        if key_pe_term is not None:
            keys = keys + key_pe_term.mT
        out = _attend_rows(q, keys, attention.split_heads(attention.v_proj(v)))
    return attention.out_proj(attention.merge_heads(out))


def _token_to_image_folded(
    attention: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_pe_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head outputs (B, heads, T, head_dim) of projected queries (B, heads, T, d)
    over unprojected image keys and values (1 or B, N, C)."""
    batch, heads, tokens, head_dim = q.shape
    q = q * head_dim**-0.5
    # Queries mapped back to the model width; q . b_k is constant over the image tokens
    # and drops out of the softmax.
    wide_q = _per_head_product(q, head_weight(attention, attention.k_proj)).flatten(1, 2)
    positional = None if key_pe_term is None else _positional_scores(q, key_pe_term)
    probs = _scores_against_rows(wide_q, k, positional).softmax(dim=-1)  # (B, heads*T, N)
    mixed = _batched_product(probs, v).view(batch, heads, tokens, -1)
    out = _per_head_product(mixed, head_weight(attention, attention.v_proj).mT)
    return out + attention.v_proj.bias.view(heads, 1, head_dim)


# -- image-to-token ----------------------------------------------------------------------


def image_to_token(
    attention: Attention,
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    residual: torch.Tensor,
    projected_q: torch.Tensor | None = None,
    query_pe_term: torch.Tensor | None = None,
    fold: bool | None = None,
) -> torch.Tensor:
    """The image attending to the tokens, plus a residual: ``residual + attention(q, k, v)``.

    Args:
        q: (1 or B, N, C) image queries; batch 1 is shared by the B token sets. Not read
            when ``projected_q`` is given.
        k, v: (B, T, C) tokens.
        residual: (1 or B, N, C) added to the output.
        projected_q: ``q`` already through :func:`project_queries`.
        query_pe_term: the queries' positional encoding through the query projection,
            from :func:`positional_term`; then ``q`` is given without the encoding.

    Returns:
        (B, N, C).
    """
    batch, tokens, _ = k.shape
    k = attention.split_heads(attention.k_proj(k))  # (B, heads, T, head_dim)
    v = attention.split_heads(attention.v_proj(v))
    if projected_q is not None:
        scores = _image_query_scores(projected_q, k)
    elif fold_image_projection(attention, batch, q.shape[0], tokens, fold):
        scores = _image_query_scores_folded(attention, q, k, query_pe_term)
    else:
        queries_t = attention.split_heads(attention.q_proj(q)).mT
        if query_pe_term is not None:
            queries_t = queries_t + query_pe_term
        scores = _image_query_scores(queries_t, k)
    # Softmax over the T tokens of each head, a middle axis: N stays the fast one.
    probs = scores.softmax(dim=2)  # (B, heads, T, N)
    if fold_output_projection(attention, tokens, fold):
        # Token values through their head's slice of the output projection; the rows of
        # each head's softmax sum to 1, so the bias is shared out over the heads.
        out_proj = attention.out_proj
        out_weight = out_proj.weight.view(attention.embedding_dim, attention.num_heads, -1)
        values = _per_head_product(v, out_weight.permute(1, 2, 0))
        values = (values + out_proj.bias / attention.num_heads).flatten(1, 2)
        return _add_product(residual, probs.reshape(batch, -1, probs.shape[-1]).mT, values)
    return residual + attention.out_proj(attention.merge_heads(probs.transpose(-1, -2) @ v))


def _image_query_scores(queries_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled scores (B, heads, T, N) of projected tokens (B, heads, T, d) against
    projected image queries, transposed: (1 or B, heads, d, N)."""
    k = k * k.shape[-1] ** -0.5
    if queries_t.shape[0] == 1:  # one product per head against all B x T tokens at once
        return _per_head_product(k, queries_t[0])
    return k @ queries_t


def _image_query_scores_folded(
    attention: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    query_pe_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`_image_query_scores` for unprojected image queries (1 or B, N, C), the
    query projection moved to the tokens."""
    batch, heads, tokens, head_dim = k.shape
    k = k * head_dim**-0.5
    wide_k = _per_head_product(k, head_weight(attention, attention.q_proj)).flatten(1, 2)
    # b_q . k varies with the token, so it stays, as a bias.
    bias = _per_head_product(k, attention.q_proj.bias.view(heads, head_dim, 1))
    if query_pe_term is None:
        scores = _scores_against_rows(wide_k, q).view(batch, heads, tokens, -1)
        return scores + bias
    positional = _positional_scores(k, query_pe_term) + bias.flatten(1, 2)
    return _scores_against_rows(wide_k, q, positional).view(batch, heads, tokens, -1)


def _per_head_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, d) times each head's matrix, weight (heads, d, c) -> (B, heads, T, c).

    One batched product over the heads; for B > 1 the B sets are stacked into the rows
    first (as einsum would), since broadcasting the weight over B would copy it B times.
    For one set this skips einsum's planning, a tenth of these small products' time.
    """
    batch, heads, tokens, dim = x.shape
    if batch == 1:
        return torch.matmul(x, weight)
    stacked = x.transpose(0, 1).reshape(heads, batch * tokens, dim)
    return (stacked @ weight).view(heads, batch, tokens, -1).transpose(0, 1)


def _batched_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, M, K) @ b (1 or B, K, P) -> (B, M, P); a shared b is one large product."""
    if b.shape[0] == 1 and a.shape[0] > 1:
        return (a.flatten(0, 1) @ b[0]).view(a.shape[0], a.shape[1], -1)
    return a @ b


def _scores_against_rows(
    a: torch.Tensor, rows: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """a (B, M, C) @ rows (1 or B, N, C).mT -> (B, M, N), plus ``base`` (B, M, N) if given.

    A shared (batch 1) right side goes in as a linear layer's weight, which the matrix
    libraries read as it lies; a transposed bfloat16 view would be copied first (~1.5 ms
    for SAM's 4096 x 256 image side on a CPU core).
    """
    if base is None:
        return F.linear(a, rows[0]) if rows.shape[0] == 1 else a @ rows.mT
    if rows.shape[0] == 1:
        flat = torch.addmm(base.flatten(0, 1), a.flatten(0, 1), rows[0].t())
        return flat.view(base.shape)
    return torch.baddbmm(base, a, rows.mT)


def _positional_scores(x: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, d) times each head's (d, N) slice of ``term`` (heads, d, N):
    (B, heads * T, N), contiguous, one product per set (broadcasting ``term`` over B
    would copy it B times)."""
    batch, heads, tokens, _ = x.shape
    parts = [torch.matmul(x[index], term) for index in range(batch)]
    stacked = parts[0][None] if batch == 1 else torch.stack(parts)
    return stacked.view(batch, heads * tokens, -1)


def _add_product(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base + a @ b for (1 or B, M, P) base and (B, M, K) @ (B, K, P), in one pass.

    Under autocast the fused form would round ``base`` to the lower precision; adding
    separately keeps the residual stream in its own dtype, as the official code does.
    """
    if torch.is_autocast_enabled(base.device.type):
        return base + a @ b
    return torch.baddbmm(base, a, b)


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of (B, h, T, d) queries over (1 or B, h, N, d) keys and values.

    Rows of a softmax are independent, so with batch-1 keys the B query sets are stacked
    into one batch of B x T rows instead of copying the keys B times.
    """
    batch, heads, tokens, dim = q.shape
    if k.shape[0] == 1 and batch > 1:
        stacked = q.transpose(0, 1).reshape(1, heads, batch * tokens, dim)
        out = F.scaled_dot_product_attention(stacked, k, v)
        return out.reshape(heads, batch, tokens, -1).transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, v)

"""The two-way transformer for inference: its image side prepared once per image.

:func:`decode` computes what :class:`~segany.modeling.transformer.TwoWayTransformer`
computes, with the cross attentions in the exact forms of :mod:`.attention`. The parts
that do not depend on the prompt are made ahead: per model (:func:`positional_terms`, the
grid encoding through the later layers' image-side projections, in float32) and per image
(:func:`prepare_image`, the first layer's projections of the image side), so that many
prompt sets against one image (clicks, the automatic generator's batches) skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from . import attention as fast


@dataclass
class ImageProjections:
    """One layer's cross-attention projections of a batch-1 image side, per head.

    Attributes:
        token_to_image: keys (with positional encoding) transposed, (1, heads, head_dim, N),
            and values, (1, heads, N, head_dim), of the token-to-image attention.
        image_to_token_queries: queries (with positional encoding) of the image-to-token
            attention, transposed: (1, heads, head_dim, N).
    """

    token_to_image: tuple[torch.Tensor, torch.Tensor]
    image_to_token_queries: torch.Tensor


@dataclass
class PositionalTerms:
    """The grid encoding through one layer's image-side projections, per head and
    transposed, (heads, head_dim, N) (see :func:`.attention.positional_term`).

    Attributes:
        token_to_image: through the token-to-image attention's key projection.
        image_to_token: through the image-to-token attention's query projection (None
            for the transformer's final attention, which has none).
    """

    token_to_image: torch.Tensor
    image_to_token: torch.Tensor | None = None


@dataclass
class PreparedImage:
    """The image side of the two-way transformer, as :func:`decode` reads it.

    Attributes:
        keys: (1 or B, N, C) image tokens (embedding plus dense prompt, N = h * w).
        key_pe: (1, N, C) their positional encoding.
        first_layer: the first layer's projections of them (batch 1 only), or None to
            make them (or fold them into the tokens) on each decode.
        positional: for each layer (None for the first when ``first_layer`` is made: its
            projections include the encoding), then the final attention, the encoding
            through their image-side projections; or None to add the encoding to each
            prompt set's image side instead.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    first_layer: ImageProjections | None = None
    positional: list[PositionalTerms | None] | None = None


def flat_grid(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h * w, C), contiguous once here rather than a strided read in
    each of the additions of a decode."""
    return grid.flatten(2).transpose(1, 2).contiguous()


def positional_terms(
    transformer: TwoWayTransformer, key_pe: torch.Tensor
) -> list[PositionalTerms | None] | None:
    """The grid encoding (1, N, C) through each layer's image-side projections (None for
    the first, whose prepared projections include it), then the final attention's; a
    constant of the model. Measured on a CPU: in float32 the pass they save per layer and
    prompt set pays (generator's decode ~9%, predict ~5% faster); in bfloat16 the passes
    are half the bytes and the small per-head products with the terms cost more than they
    save, so there they are None."""
    if key_pe.dtype != torch.float32 or not transformer.depth:
        return None
    terms: list[PositionalTerms | None] = [None]
    for layer in list(transformer.layers)[1:]:
        token_to_image, image_to_token = (
            layer.cross_attn_token_to_image,
            layer.cross_attn_image_to_token,
        )
        terms.append(
            PositionalTerms(
                token_to_image=fast.positional_term(token_to_image, key_pe, token_to_image.k_proj),
                image_to_token=fast.positional_term(image_to_token, key_pe, image_to_token.q_proj),
            )
        )
    final = transformer.final_attn_token_to_image
    terms.append(PositionalTerms(fast.positional_term(final, key_pe, final.k_proj)))
    return terms


def project_image(
    layer: TwoWayAttentionBlock, keys: torch.Tensor, key_pe: torch.Tensor
) -> ImageProjections:
    """``layer``'s projections of image keys (1, N, C) with their encoding (1, N, C)."""
    keys_with_pe = keys + key_pe
    return ImageProjections(
        token_to_image=fast.project_keys(layer.cross_attn_token_to_image, keys_with_pe, keys),
        image_to_token_queries=fast.project_queries(layer.cross_attn_image_to_token, keys_with_pe),
    )


def prepare_image(
    transformer: TwoWayTransformer,
    keys: torch.Tensor,
    key_pe: torch.Tensor,
    positional: list[PositionalTerms | None] | None = None,
    project: bool = True,
) -> PreparedImage:
    """The image side for :func:`decode`: image tokens ``keys`` (1 or B, N, C), their
    encoding ``key_pe`` (1, N, C) and the model's :func:`positional_terms` of it; with
    ``project`` (worth it when many prompt sets are decoded against one image) and a
    batch-1 side, the first layer's projections of it (most of that layer's image work,
    and the products against them are small)."""
    if not project or not transformer.depth or keys.shape[0] != 1:
        return PreparedImage(keys, key_pe)
    first = project_image(transformer.layers[0], keys, key_pe)
    return PreparedImage(keys, key_pe, first, positional)


def _block(
    layer: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    projections: ImageProjections | None,
    positional: PositionalTerms | None,
    fold: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer(queries, keys, query_pe, key_pe)`` with a prepared image side: its
    ``projections`` (first layer) or its encoding's ``positional`` terms, if made."""
    if layer.skip_first_layer_pe:
        # The first layer replaces the tokens: they already are positional encodings.
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)

    # The encoding joins the image side here only when no projection of it was made.
    with_pe = projections is None and positional is None
    keys_with_pe = keys + key_pe if with_pe else keys
    attn = fast.token_to_image(
        layer.cross_attn_token_to_image,
        q=queries + query_pe,
        k=keys_with_pe,
        v=keys,
        projected=None if projections is None else projections.token_to_image,
        key_pe_term=None if positional is None else positional.token_to_image,
        fold=fold,
    )
    queries = layer.norm2(queries + attn)
    queries = layer.norm3(queries + layer.mlp(queries))

    q = queries + query_pe
    keys = fast.image_to_token(
        layer.cross_attn_image_to_token,
        q=keys_with_pe,
        k=q,
        v=queries,
        residual=keys,
        projected_q=None if projections is None else projections.image_to_token_queries,
        query_pe_term=None if positional is None else positional.image_to_token,
        fold=fold,
    )
    return queries, layer.norm4(keys)


def decode(
    transformer: TwoWayTransformer,
    image: PreparedImage,
    point_embedding: torch.Tensor,
    output_tokens: int | None = None,
    fold: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformer(image, pe, point_embedding)`` on a :class:`PreparedImage`.

    Args:
        point_embedding: (B, N, C) output and prompt tokens.
        output_tokens: return only the first this many tokens (default all N); the final
            attention then runs for those alone (the mask decoder reads only its IoU and
            mask tokens).
        fold: the attention forms (see :mod:`.attention`).

    Returns:
        Tokens (B, N or output_tokens, C) and image features (B, h * w, C).
    """
    keys, key_pe = image.keys, image.key_pe
    # The terms serve the layers after a projected first one; without it, none.
    positional = image.positional if image.first_layer is not None else None
    positional = positional or [None] * (transformer.depth + 1)
    queries = point_embedding
    for index, layer in enumerate(transformer.layers):
        projections = image.first_layer if index == 0 else None
        queries, keys = _block(
            layer, queries, keys, point_embedding, key_pe, projections, positional[index], fold
        )
    queries, point_embedding = queries[:, :output_tokens], point_embedding[:, :output_tokens]
    final_pe = positional[-1]
    attn_out = fast.token_to_image(
        transformer.final_attn_token_to_image,
        q=queries + point_embedding,
        k=keys if final_pe is not None else keys + key_pe,
        v=keys,
        key_pe_term=None if final_pe is None else final_pe.token_to_image,
        fold=fold,
    )
    keys = keys.expand(queries.shape[0], -1, -1)  # depth 0: the image side is still shared
    return transformer.norm_final_attn(queries + attn_out), keys

"""SAM's two-way transformer: prompt tokens and image embedding attend to each other.

Image-side tensors may have batch 1 while the tokens have batch B: one image embedding
(plus the no-mask dense prompt) shared by B prompt sets, as in the automatic mask
generator. The cross attentions then project the shared image side once instead of B
times. When B x heads x tokens is small against the inner dimension, as for one prompt
set, they instead fold the image-side projections into the token side (exact algebra,
see :class:`Attention`), which skips projecting the 4096 image tokens at all. For many
decodes against one image, :meth:`TwoWayTransformer.prepare_image` makes the first
layer's image-side projections (which do not depend on the prompt) once, and in float32
the positional encoding's share of the later layers' projections, for
:meth:`TwoWayTransformer.decode` to reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


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
    transposed, (heads, head_dim, N) (see :meth:`Attention.positional_term`).

    Attributes:
        token_to_image: through the token-to-image attention's key projection.
        image_to_token: through the image-to-token attention's query projection (None
            for the transformer's final attention, which has none).
    """

    token_to_image: torch.Tensor
    image_to_token: torch.Tensor | None = None


@dataclass
class PreparedImage:
    """The image side of the two-way transformer, from :meth:`TwoWayTransformer.prepare_image`.

    Attributes:
        keys: (1 or B, N, C) image tokens (embedding plus dense prompt, N = h * w).
        key_pe: (1, N, C) their positional encoding.
        first_layer: the first layer's projections of them (batch 1 only), or None to
            make them (or fold them into the tokens) on each decode.
        positional: for each layer (None for the first, whose projections include it),
            then the final attention, the encoding through their image-side projections;
            or None to add the encoding to each prompt set's image side instead.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    first_layer: ImageProjections | None = None
    positional: list[PositionalTerms | None] | None = None


class Attention(nn.Module):
    """Multi-head attention with an optional down-projection of the inner dimension.

    Besides the plain :meth:`forward`, :meth:`token_to_image` and :meth:`image_to_token`
    compute the same function for SAM's two cross attentions, choosing by a count of
    multiply-adds between two exact forms. With ``W_h`` the rows of a projection that
    make head h and ``s`` the softmax scale:

    * a score ``s (W_q,h a + b_q,h) . (W_k,h x + b_k,h)`` equals
      ``(s W_k,h^T (W_q,h a + b_q,h)) . x`` plus a term constant over x, so projecting the
      few token-side vectors back to the model width replaces projecting every image token
      (the constant drops out of a softmax over image tokens, and is kept otherwise);
    * an output ``W_o (sum_j p_j (W_v x_j + b_v))`` with ``sum_j p_j = 1`` per head
      equals ``sum_h W_o,h W_v,h (sum_j p_h,j x_j) + W_o b_v``, and for image queries over
      token values ``sum_h sum_t p_h,t (W_o,h v_h,t)``: one product with pre-projected
      token values instead of an inner-width output projection per image token.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        # None: fold image-side projections when that is cheaper; True/False forces it.
        self.fold_projections: bool | None = None

    @property
    def head_dim(self) -> int:
        return self.internal_dim // self.num_heads

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, inner) -> (B, heads, N, head_dim)."""
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, inner)."""
        batch, heads, tokens, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def _head_weight(self, linear: nn.Linear) -> torch.Tensor:
        """A projection's weight per head: (heads, head_dim, embedding_dim)."""
        return linear.weight.view(self.num_heads, self.head_dim, self.embedding_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, Nq, C); k, v: (B, Nk, C) -> (B, Nq, C)."""
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(self._merge_heads(out))

    # -- cost model: multiply-adds per image token of each exact form -------------------

    def _fold_image_projection(self, batch: int, image_batch: int, tokens: int) -> bool:
        """Whether folding one image-side projection into the token side is cheaper."""
        if self.fold_projections is not None:
            return self.fold_projections
        head_tokens = self.num_heads * tokens
        projected = image_batch * self.embedding_dim * self.internal_dim
        projected += batch * head_tokens * self.head_dim
        return batch * head_tokens * self.embedding_dim < projected

    def _fold_output_projection(self, tokens: int) -> bool:
        """Whether image-query outputs are cheaper from pre-projected token values."""
        if self.fold_projections is not None:
            return self.fold_projections
        head_tokens = self.num_heads * tokens
        plain = head_tokens * self.head_dim + self.internal_dim * self.embedding_dim
        return head_tokens * self.embedding_dim < plain

    # -- token-to-image ----------------------------------------------------------------

    def token_to_image(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        projected: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_pe_term: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens attending to the image: :meth:`forward` with a shareable image side.

        Args:
            q: (B, T, C) tokens.
            k, v: (1 or B, N, C) image keys and values; batch 1 is shared by the B token sets.
                Not read when ``projected`` is given.
            projected: a batch-1 ``k`` and ``v`` already through this attention's
                projections, from :meth:`project_keys`.
            key_pe_term: the keys' positional encoding through the key projection, from
                :meth:`positional_term`; then ``k`` is given without the encoding.

        Returns:
            (B, T, C).
        """
        batch, tokens, _ = q.shape
        q = self._split_heads(self.q_proj(q))  # (B, heads, T, head_dim)
        if projected is not None:
            keys_t, values = projected
            scores = _per_head_product(q * self.head_dim**-0.5, keys_t[0])
            out = _per_head_product(scores.softmax(dim=-1), values[0])
        elif self._fold_image_projection(batch, k.shape[0], tokens):
            out = self._token_to_image_folded(q, k, v, key_pe_term)
        else:
            keys = self._split_heads(self.k_proj(k))
            if key_pe_term is not None:
                keys = keys + key_pe_term.mT
            out = _attend_rows(q, keys, self._split_heads(self.v_proj(v)))
        return self.out_proj(self._merge_heads(out))

    def _token_to_image_folded(
        self,
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
        wide_q = _per_head_product(q, self._head_weight(self.k_proj)).flatten(1, 2)
        positional = None if key_pe_term is None else _positional_scores(q, key_pe_term)
        probs = _scores_against_rows(wide_q, k, positional).softmax(dim=-1)  # (B, heads*T, N)
        mixed = _batched_product(probs, v).view(batch, heads, tokens, -1)
        out = _per_head_product(mixed, self._head_weight(self.v_proj).mT)
        return out + self.v_proj.bias.view(heads, 1, head_dim)

    # -- projections of the image side made once for many decodes ---------------------

    def project_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image keys and values (1, N, C) through the key and value projections, per head:
        keys transposed (1, heads, head_dim, N) and values (1, heads, N, head_dim), both
        contiguous, as the products of ``token_to_image(projected=)`` read them."""
        keys_t = self._split_heads(self.k_proj(k)).mT.contiguous()
        return keys_t, self._split_heads(self.v_proj(v)).contiguous()

    def project_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Image queries (1, N, C) through the query projection, per head and transposed:
        (1, heads, head_dim, N) contiguous, for ``image_to_token(projected_q=)``."""
        return self._split_heads(self.q_proj(q)).mT.contiguous()

    def positional_term(self, pe: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        """A (1, N, C) positional encoding through ``projection``'s weight (no bias), per
        head and transposed: (heads, head_dim, N). Added to the projected image side, it
        stands for adding the encoding before projecting, which would cost a pass over
        the image side of every prompt set."""
        return self._split_heads(F.linear(pe, projection.weight))[0].mT.contiguous()

    # -- image-to-token ----------------------------------------------------------------

    def image_to_token(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor,
        projected_q: torch.Tensor | None = None,
        query_pe_term: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The image attending to the tokens, plus a residual: ``residual + forward(q, k, v)``.

        Args:
            q: (1 or B, N, C) image queries; batch 1 is shared by the B token sets. Not read
                when ``projected_q`` is given.
            k, v: (B, T, C) tokens.
            residual: (1 or B, N, C) added to the output.
            projected_q: ``q`` already through :meth:`project_queries`.
            query_pe_term: the queries' positional encoding through the query projection,
                from :meth:`positional_term`; then ``q`` is given without the encoding.

        Returns:
            (B, N, C).
        """
        batch, tokens, _ = k.shape
        k = self._split_heads(self.k_proj(k))  # (B, heads, T, head_dim)
        v = self._split_heads(self.v_proj(v))
        if projected_q is not None:
            scores = self._image_query_scores(projected_q, k)
        elif self._fold_image_projection(batch, q.shape[0], tokens):
            scores = self._image_query_scores_folded(q, k, query_pe_term)
        else:
            queries_t = self._split_heads(self.q_proj(q)).mT
            if query_pe_term is not None:
                queries_t = queries_t + query_pe_term
            scores = self._image_query_scores(queries_t, k)
        # Softmax over the T tokens of each head, a middle axis: N stays the fast one.
        probs = scores.softmax(dim=2)  # (B, heads, T, N)
        if self._fold_output_projection(tokens):
            # Token values through their head's slice of the output projection; the rows of
            # each head's softmax sum to 1, so the bias is shared out over the heads.
            out_weight = self.out_proj.weight.view(self.embedding_dim, self.num_heads, -1)
            values = _per_head_product(v, out_weight.permute(1, 2, 0))
            values = (values + self.out_proj.bias / self.num_heads).flatten(1, 2)
            return _add_product(residual, probs.reshape(batch, -1, probs.shape[-1]).mT, values)
        return residual + self.out_proj(self._merge_heads(probs.transpose(-1, -2) @ v))

    def _image_query_scores(self, queries_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled scores (B, heads, T, N) of projected tokens (B, heads, T, d) against
        projected image queries, transposed: (1 or B, heads, d, N)."""
        k = k * k.shape[-1] ** -0.5
        if queries_t.shape[0] == 1:  # one product per head against all B x T tokens at once
            return _per_head_product(k, queries_t[0])
        return k @ queries_t

    def _image_query_scores_folded(
        self, q: torch.Tensor, k: torch.Tensor, query_pe_term: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`_image_query_scores` for unprojected image queries (1 or B, N, C), the
        query projection moved to the tokens."""
        batch, heads, tokens, head_dim = k.shape
        k = k * head_dim**-0.5
        wide_k = _per_head_product(k, self._head_weight(self.q_proj)).flatten(1, 2)
        # b_q . k varies with the token, so it stays, as a bias.
        bias = _per_head_product(k, self.q_proj.bias.view(heads, head_dim, 1))
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


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image, MLP, then image-to-token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def positional_terms(self, key_pe: torch.Tensor) -> PositionalTerms:
        """This layer's :class:`PositionalTerms` for the encoding (1, N, C)."""
        token_to_image, image_to_token = (
            self.cross_attn_token_to_image,
            self.cross_attn_image_to_token,
        )
        return PositionalTerms(
            token_to_image=token_to_image.positional_term(key_pe, token_to_image.k_proj),
            image_to_token=image_to_token.positional_term(key_pe, image_to_token.q_proj),
        )

    def project_image(self, keys: torch.Tensor, key_pe: torch.Tensor) -> ImageProjections:
        """This layer's projections of image keys (1, N, C) with their positional
        encoding (1, N, C), for :meth:`forward`'s ``projections``."""
        keys_with_pe = keys + key_pe
        return ImageProjections(
            token_to_image=self.cross_attn_token_to_image.project_keys(keys_with_pe, keys),
            image_to_token_queries=self.cross_attn_image_to_token.project_queries(keys_with_pe),
        )

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        projections: ImageProjections | None = None,
        positional: PositionalTerms | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries, query_pe: (B, T, C); keys: (1 or B, N, C); key_pe: (1, N, C);
        ``projections``: :meth:`project_image` of these keys, if already made;
        ``positional``: :meth:`positional_terms` of key_pe, if already made.

        Returns queries (B, T, C) and keys (B, N, C).
        """
        if self.skip_first_layer_pe:
            # The first layer replaces the tokens: they already are positional encodings.
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # The encoding joins the image side here only when no projection of it was made.
        with_pe = projections is None and positional is None
        keys_with_pe = keys + key_pe if with_pe else keys
        q = queries + query_pe
        attn = self.cross_attn_token_to_image.token_to_image(
            q=q,
            k=keys_with_pe,
            v=keys,
            projected=None if projections is None else projections.token_to_image,
            key_pe_term=None if positional is None else positional.token_to_image,
        )
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.cross_attn_image_to_token.image_to_token(
            q=keys_with_pe,
            k=q,
            v=queries,
            residual=keys,
            projected_q=None if projections is None else projections.image_to_token_queries,
            query_pe_term=None if positional is None else positional.image_to_token,
        )
        return queries, self.norm4(keys)


class TwoWayTransformer(nn.Module):
    """Decoder transformer of SAM.

    Args:
        depth: number of :class:`TwoWayAttentionBlock` layers.
        embedding_dim: channel dimension C.
        num_heads: attention heads.
        mlp_dim: hidden size of the token MLP.
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        output_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder transformer.

        Args:
            image_embedding: (1 or B, C, h, w) image embedding (plus dense prompt); batch 1
                is shared by all B token sets.
            image_pe: (1, C, h, w) positional encoding of the grid.
            point_embedding: (B, N, C) output and prompt tokens.
            output_tokens: return only the first this many tokens (default all N); the
                final attention then runs for those alone (the mask decoder reads only its
                IoU and mask tokens).

        Returns:
            Processed tokens (B, N or output_tokens, C) and image features (B, h * w, C).
        """
        image = self.prepare_image(image_embedding, image_pe, project=False)
        return self.decode(image, point_embedding, output_tokens)

    def prepare_image(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, project: bool = True
    ) -> PreparedImage:
        """The image side of :meth:`forward` as :meth:`decode` reads it; with ``project``
        (worth it when many prompt sets are decoded against one image), the first layer's
        projections of it (batch 1 only: they are most of that layer's image work, and
        the products against them are small) and, in float32, the encoding through the
        later attentions' projections (a pass less over each set's image side per
        layer)."""
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        # Contiguous once here rather than a strided read in each of the additions below.
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        if not project or not self.depth:
            return PreparedImage(keys=keys, key_pe=key_pe)
        first = self.layers[0].project_image(keys, key_pe) if keys.shape[0] == 1 else None
        # Measured on a CPU: in float32 the pass saved per layer pays (generator's decode
        # ~9%, predict ~5% faster); in bfloat16 the passes are half the bytes and the
        # small per-head products with the terms cost more than they save.
        if keys.dtype != torch.float32:
            return PreparedImage(keys, key_pe, first)
        final = self.final_attn_token_to_image
        positional = [
            None if first is not None and index == 0 else layer.positional_terms(key_pe)
            for index, layer in enumerate(self.layers)
        ]
        positional.append(PositionalTerms(final.positional_term(key_pe, final.k_proj)))
        return PreparedImage(keys, key_pe, first, positional)

    def prepared_weights(self) -> list[torch.Tensor]:
        """The parameters that :meth:`prepare_image`'s projections are made with."""
        linears = [self.final_attn_token_to_image.k_proj]
        for layer in self.layers:
            token_to_image = layer.cross_attn_token_to_image
            linears += [token_to_image.k_proj, token_to_image.v_proj]
            linears.append(layer.cross_attn_image_to_token.q_proj)
        return [t for linear in linears for t in (linear.weight, linear.bias)]

    def decode(
        self,
        image: PreparedImage,
        point_embedding: torch.Tensor,
        output_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` on an image side from :meth:`prepare_image`."""
        keys, key_pe = image.keys, image.key_pe
        positional = image.positional or [None] * (self.depth + 1)
        queries = point_embedding
        for index, layer in enumerate(self.layers):
            queries, keys = layer(
                queries=queries,
                keys=keys,
                query_pe=point_embedding,
                key_pe=key_pe,
                projections=image.first_layer if index == 0 else None,
                positional=positional[index],
            )
        queries, point_embedding = queries[:, :output_tokens], point_embedding[:, :output_tokens]
        final_pe = positional[-1]
        attn_out = self.final_attn_token_to_image.token_to_image(
            q=queries + point_embedding,
            k=keys if final_pe is not None else keys + key_pe,
            v=keys,
            key_pe_term=None if final_pe is None else final_pe.token_to_image,
        )
        if keys.shape[0] != queries.shape[0]:  # depth 0: the image side is still shared
            keys = keys.expand(queries.shape[0], -1, -1)
        return self.norm_final_attn(queries + attn_out), keys

"""SAM's mask decoder: tokens -> mask logits and predicted IoU."""

from __future__ import annotations

import weakref
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, weights_key
from .transformer import PreparedImage, TwoWayTransformer

# Prompt sets decoded together. The per-set image features (4 MB each at SAM's size) of a
# few sets stay in cache between the decoder's passes over them; 64 at once (the mask
# generator's batch) measured 10-15% slower on 2 CPU cores, and need 16x the memory.
PROMPT_CHUNK = 4


class MLP(nn.Module):
    """Plain MLP with ReLU between ``num_layers`` linear layers."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    """Predicts masks from an image embedding and prompt tokens.

    One IoU token and ``num_multimask_outputs + 1`` mask tokens go through the
    two-way transformer with the prompt tokens; each mask token becomes, through
    its own hypernetwork MLP, the weights of a dot product with the upscaled
    image features. Token 0 is the single-mask output, tokens 1.. the multimask ones.

    With ``high_res_in_chans`` = (c4, c8), as in SAM 2, the image encoder's features at
    1/4 and 1/8 of the input, projected by ``conv_s0`` and ``conv_s1`` (see
    :meth:`project_high_res`), are added into the two upscaling steps, so mask edges can
    follow detail finer than the 1/16 embedding.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        high_res_in_chans: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        self.use_high_res_features = high_res_in_chans is not None
        if high_res_in_chans is not None:
            self.conv_s0 = nn.Conv2d(high_res_in_chans[0], transformer_dim // 8, 1)
            self.conv_s1 = nn.Conv2d(high_res_in_chans[1], transformer_dim // 4, 1)
        self._hypernetwork_cache: tuple[tuple[object, ...], list] | None = None
        self._image_cache: _ImageCache | None = None

    def project_high_res(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The encoder's (B, c4, 4h, 4w) and (B, c8, 2h, 2w) features -> what
        ``high_res_features`` takes: (B, C / 8, 4h, 4w) and (B, C / 4, 2h, 2w). Once per
        image (SAM 2 does this when the image is set)."""
        return [self.conv_s0(features[0]), self.conv_s1(features[1])]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        min_iou: float | None = None,
        keep_image: bool = False,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Args:
            image_embeddings: (1 or B, C, h, w); a single embedding is shared by all B prompts.
            image_pe: (1, C, h, w) positional encoding of the grid.
            sparse_prompt_embeddings: (B, N, C) prompt tokens.
            dense_prompt_embeddings: (B, C, h, w) mask-prompt embedding.
            multimask_output: return the 3 multimask outputs instead of the single one.
            min_iou: upscale only the prompt sets with a returned mask whose predicted IoU
                (in float32) is above this; the others' logits are -inf (empty masks).
                For callers that drop masks under a predicted-IoU threshold anyway, as the
                automatic mask generator does: the upscaling is most of a decode.
            keep_image: keep the image side prepared for this call (the first layer's
                projections of it) for the next call against the same image, for callers
                that decode one image many times (the predictor, the generator).
            high_res_features: for a decoder with ``use_high_res_features``, the projected
                features of :meth:`project_high_res`, batch 1 (shared) or B.

        Returns:
            Mask logits (B, 3 or 1, 4h, 4w) and predicted IoU (B, 3 or 1).
        """
        selected = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            mask_tokens=selected,
            min_iou=min_iou,
            keep_image=keep_image,
            high_res_features=high_res_features,
        )
        return masks, iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_tokens: slice = slice(None),
        min_iou: float | None = None,
        keep_image: bool = False,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B, M, 4h, 4w) of the ``mask_tokens`` (default: all ``num_mask_tokens``;
        only those are computed; ``min_iou``, ``keep_image`` and ``high_res_features`` as
        in :meth:`forward`) and IoU predictions (B, num_mask_tokens) of all."""
        if self.use_high_res_features != (high_res_features is not None):
            raise ValueError(
                "this decoder needs high_res_features (see project_high_res)"
                if self.use_high_res_features
                else "this decoder takes no high_res_features"
            )
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1
        )
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets; "
                "give one embedding or one per prompt set"
            )
        # A dense prompt equal for all sets (the no-mask embedding, expanded) keeps the image
        # side at batch 1, so the transformer works on it once for all the sets of a chunk.
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]
        size = (image_embeddings.shape[-2], image_embeddings.shape[-1])
        shared = self._shared_image(image_embeddings, image_pe, dense, batch, keep_image)
        src = image_embeddings + dense if shared is None else None
        parts = []
        for start in range(0, batch, PROMPT_CHUNK):
            image = shared
            if image is None:
                chunk_src = src[start : start + PROMPT_CHUNK]
                image = self.transformer.prepare_image(chunk_src, image_pe, project=False)
            chunk = tokens[start : start + PROMPT_CHUNK]
            high_res = _chunk_of(high_res_features, start, PROMPT_CHUNK)
            parts.append(self._predict_chunk(image, chunk, size, mask_tokens, min_iou, high_res))
        masks, iou_pred = zip(*parts, strict=True)
        return torch.cat(masks), torch.cat(iou_pred)

    def _shared_image(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense: torch.Tensor,
        batch: int,
        keep_image: bool,
    ) -> PreparedImage | None:
        """The transformer's image side when one (1, C, h, w) embedding and dense prompt
        serve all ``batch`` prompt sets, else None.

        With ``keep_image`` and a dense prompt uniform over the grid (the no-mask
        embedding), the side is prepared with its projections and kept for the next call
        against the same image (the clicks of an interactive session, the generator's
        batches): they are most of the first layer's work against the image. Otherwise
        they are made only when several chunks of this call will read them. A kept side
        is made on the first call, so that a prompt gives the same numbers every time.
        """
        if image_embeddings.shape[0] != 1 or dense.shape[0] != 1:
            return None
        sources = (image_embeddings, image_pe)
        key = self._image_key(sources, dense) if keep_image else None
        cache = self._image_cache
        if key is not None and cache is not None and cache.matches(sources, key, dense):
            return cache.image
        project = key is not None or batch > PROMPT_CHUNK
        image = self.transformer.prepare_image(image_embeddings + dense, image_pe, project)
        if key is not None:
            self._image_cache = _ImageCache(sources, key, dense, image)
        return image

    def _image_key(
        self, sources: tuple[torch.Tensor, ...], dense: torch.Tensor
    ) -> tuple[object, ...] | None:
        """What a prepared image side depends on besides the identity of ``sources`` (the
        embedding and the grid encoding) and the dense prompt's value; None when it must
        not be kept: a dense prompt that varies over the grid (a mask prompt, different
        on every call), gradients wanted, tracing or compiling."""
        if dense.stride(-1) != 0 or dense.stride(-2) != 0:
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*sources, dense)):
            return None
        weights = weights_key(self.transformer.prepared_weights())
        if weights is None:
            return None
        device = dense.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        geometry = tuple((t._version, t.storage_offset(), t.shape, t.stride()) for t in sources)
        return geometry, weights, autocast, tuple(t.dtype for t in (*sources, dense))

    def _predict_chunk(
        self,
        image: PreparedImage,
        tokens: torch.Tensor,
        size: tuple[int, int],
        mask_tokens: slice,
        min_iou: float | None,
        high_res: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_masks` for an image side of batch 1 or B and (B, N, C) tokens, on
        an (h, w) = ``size`` grid."""
        hs, src = self.transformer.decode(image, tokens, output_tokens=1 + self.num_mask_tokens)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        selected = range(self.num_mask_tokens)[mask_tokens]
        hyper_in = self._hypernetworks(mask_tokens_out[:, mask_tokens], selected)
        wanted = None
        if min_iou is not None:
            wanted = (iou_pred[:, mask_tokens].float() > min_iou).any(dim=1).tolist()
        return self._masks(src, hyper_in, size, wanted, high_res), iou_pred

    def _hypernetworks(self, tokens: torch.Tensor, selected: range) -> torch.Tensor:
        """The ``selected`` hypernetwork MLPs on their mask tokens (B, M, C) -> (B, M, C / 8),
        as one batched product per layer (a third of the small products' time)."""
        x = tokens.transpose(0, 1)  # (M, B, C)
        layers = self._stacked_hypernetworks(selected)
        for depth, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias, x, weight)
            if depth < len(layers) - 1:
                x = F.relu(x)
        if self.output_hypernetworks_mlps[0].sigmoid_output:
            x = torch.sigmoid(x)
        return x.transpose(0, 1)

    def _stacked_hypernetworks(self, selected: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer of the ``selected`` hypernetworks: weights (M, in, out) and biases
        (M, 1, out), kept while those parameters are unchanged (and no gradient is needed:
        then they are stacked on each call, so that gradients reach the parameters)."""
        mlps = [self.output_hypernetworks_mlps[i] for i in selected]
        params = [t for mlp in mlps for layer in mlp.layers for t in (layer.weight, layer.bias)]
        weights = weights_key(params)
        key = None if weights is None else (selected, weights)
        cached = self._hypernetwork_cache
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        layers = [
            (
                torch.stack([mlp.layers[depth].weight.mT for mlp in mlps]),
                torch.stack([mlp.layers[depth].bias for mlp in mlps]).unsqueeze(1),
            )
            for depth in range(len(mlps[0].layers))
        ]
        if key is not None:
            self._hypernetwork_cache = (key, layers)
        return layers

    def _masks(
        self,
        src: torch.Tensor,
        hyper_in: torch.Tensor,
        size: tuple[int, int],
        wanted: list[bool] | None = None,
        high_res: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mask logits (B, T, 4h, 4w) from transformer output (B, h * w, C) and the
        hypernetwork weights (B, T, C / 8), one prompt set at a time; the sets not
        ``wanted`` (default: all are) get -inf. ``high_res``: projected high-resolution
        features (batch 1 or B), added after each transposed convolution as in SAM 2.

        The output upscaling runs as matrix products: a 2x2 stride-2 transposed convolution
        maps each input pixel to a 2x2 block on its own, so it is a linear layer. Taken one
        kernel row at a time, its outputs for input pixel (y, x) are the pixels (2y + i,
        2x + j) of one output row, already in raster order; so each of the four (row, row)
        pairs of the two convolutions yields every fourth row of the masks directly, and
        only whole rows are interleaved at the end (a pixel-level shuffle of the masks
        cost more than the products on a CPU). One set's features (8 MB in float32) stay
        in cache through the passes over them.
        """
        first, norm, act1, second, act2 = self.output_upscaling
        height, width = size
        first_rows, second_rows = _kernel_rows(first), _kernel_rows(second)
        # Shared high-resolution features are laid out for the passes once, not per set.
        shared = high_res is not None and all(f.shape[0] == 1 for f in high_res)
        layout = _kernel_row_layout(high_res, 0) if shared else None
        masks = []
        for index, (features, weights) in enumerate(zip(src, hyper_in, strict=True)):
            if wanted is not None and not wanted[index]:
                shape = (weights.shape[0], 4 * height, 4 * width)
                masks.append(features.new_full(shape, float("-inf")))
                continue
            if high_res is not None and not shared:
                layout = _kernel_row_layout(high_res, index)
            rows = []
            for i, (w1, b1) in enumerate(first_rows):
                x = F.linear(features, w1, b1).view(-1, w1.shape[0] // 2)  # pixels (y, x, j)
                if layout is not None:  # rows 2y + i of the 1/2-upscaled grid
                    x = x + layout[1][i]
                x = _activate(
                    act1, F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
                )
                for i2, (w2, b2) in enumerate(second_rows):
                    upscaled = F.linear(x, w2, b2).view(-1, w2.shape[0] // 2)
                    if layout is not None:  # rows 4y + 2i + i2 of the full-size grid
                        upscaled = upscaled + layout[0][2 * i + i2]
                    upscaled = _activate(act2, upscaled)
                    rows.append(F.linear(weights, upscaled).view(-1, height, 4 * width))
            # rows[2i + i2] holds mask rows 4y + 2i + i2.
            masks.append(torch.stack(rows, dim=2).view(-1, 4 * height, 4 * width))
        return torch.stack(masks)


def _chunk_of(
    features: list[torch.Tensor] | None, start: int, count: int
) -> list[torch.Tensor] | None:
    """Prompt sets ``start`` to ``start + count`` of per-set features (shared ones whole)."""
    if features is None:
        return None
    return [f if f.shape[0] == 1 else f[start : start + count] for f in features]


def _kernel_row_layout(
    features: list[torch.Tensor], index: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt set ``index``'s (fine, medium) high-resolution features in the pixel layout
    of the upscaling's kernel-row passes: fine rows 4y + p for p = 0..3, medium rows
    2y + i for i = 0, 1, each (pixels, C)."""
    fine, medium = (f[0] if f.shape[0] == 1 else f[index] for f in features)
    return (
        [_rows_as_pixels(fine, phase, 4) for phase in range(4)],
        [_rows_as_pixels(medium, phase, 2) for phase in range(2)],
    )


def _rows_as_pixels(features: torch.Tensor, phase: int, every: int) -> torch.Tensor:
    """Rows ``phase``, ``phase + every``, ... of (C, H, W) features as (pixels, C) in raster
    order: the pixel layout of one kernel-row pass of the upscaling."""
    return features[:, phase::every].permute(1, 2, 0).reshape(-1, features.shape[0])


def _activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)``; a float32 GELU runs in place when no gradient needs ``x``
    (measured 20% faster for the upscaling on a CPU; bfloat16's in-place kernel was
    slower than the out-of-place one)."""
    in_place = x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
    if in_place and type(activation) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


def _kernel_rows(
    conv: nn.ConvTranspose2d,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """A 2x2 stride-2 transposed convolution as two linear layers, one per kernel row i:
    weight (2 * out, in) and bias, outputs ordered (j, out channel) for kernel column j."""
    bias = None if conv.bias is None else conv.bias.repeat(2)
    # (in, out, i, j) -> for each i: (j, out, in)
    return [(conv.weight[:, :, i].permute(2, 1, 0).flatten(0, 1), bias) for i in range(2)]


def _owner(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory ``tensor`` views (itself if it is not a view)."""
    return tensor if tensor._base is None else tensor._base


def _no_image_cache() -> None:
    return None


class _ImageCache:
    """A prepared image side with what it was made from: the tensors owning the memory of
    the embedding and of the grid encoding, held weakly (a new image may reuse a freed
    one's address, never a live tensor's), a key of their versions, views, dtypes and the
    weights, and the dense prompt's vector."""

    def __init__(
        self,
        sources: tuple[torch.Tensor, ...],
        key: tuple[object, ...],
        dense: torch.Tensor,
        image: PreparedImage,
    ) -> None:
        self._owners = [weakref.ref(_owner(t)) for t in sources]
        self._key = key
        self._dense = dense[0, :, 0, 0].clone()
        self.image = image

    def __reduce__(self) -> tuple[object, tuple[()]]:
        # Not carried into copies (the bfloat16 decoder copy prepares its own) or pickles
        # (a saved or sent model): they come back with no kept image.
        return _no_image_cache, ()

    def matches(
        self, sources: tuple[torch.Tensor, ...], key: tuple[object, ...], dense: torch.Tensor
    ) -> bool:
        return (
            key == self._key
            and all(ref() is _owner(t) for ref, t in zip(self._owners, sources, strict=True))
            and torch.equal(dense[0, :, 0, 0], self._dense)
        )

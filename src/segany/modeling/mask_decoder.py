"""SAM's mask decoder: tokens -> mask logits and predicted IoU.

The plain form, which training and export run; :mod:`segany.inference.mask_decoder` runs
the same function faster for many prompts against one image.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .transformer import TwoWayTransformer


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


class MaskDecoderOutput(NamedTuple):
    """Everything the decoder predicts for B prompt sets (SAM 2's four outputs).

    Attributes:
        masks: mask logits (B, M, 4h, 4w).
        iou_pred: predicted IoU (B, M); in [0, 1] with ``iou_prediction_use_sigmoid``.
        mask_tokens: (B, M', C) transformer outputs of the mask tokens, from which SAM 2's
            video model makes its object pointers.
        object_score_logits: (B, 1), > 0 where the decoder sees an object; 10 (sure) for a
            decoder without ``pred_obj_scores``, as in SAM 2.
    """

    masks: torch.Tensor
    iou_pred: torch.Tensor
    mask_tokens: torch.Tensor
    object_score_logits: torch.Tensor


def stability_scores(mask_logits: torch.Tensor, delta: float) -> torch.Tensor:
    """(..., H, W) logits -> (...): the IoU of the mask thresholded at +delta with the mask
    thresholded at -delta (1 where both are empty). Close to 1 when few logits are near 0."""
    logits = mask_logits.flatten(-2)
    inner = (logits > delta).sum(dim=-1).float()
    outer = (logits > -delta).sum(dim=-1).float()
    return torch.where(outer > 0, inner / outer, 1.0)


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

    SAM 2's other additions, all off by default (SAM's decoder):

    - ``pred_obj_scores``: one more output token, whose output goes through
      ``pred_obj_score_head`` (a linear layer, or a 3-layer MLP with
      ``pred_obj_scores_mlp``) to a logit saying whether the object is in the image.
    - ``iou_prediction_use_sigmoid``: the IoU head ends in a sigmoid.
    - ``dynamic_multimask_via_stability``: when one mask is asked for (and not training),
      the single-mask output is replaced by the multimask output of highest predicted IoU
      wherever its stability score (:func:`stability_scores` with
      ``dynamic_multimask_stability_delta``) is below ``dynamic_multimask_stability_thresh``.
    - ``use_multimask_token_for_obj_ptr``: :meth:`decode` returns the 3 multimask tokens as
      ``mask_tokens`` when multimask output is asked for (else always token 0).

    Parameter names are those of SAM 2's checkpoints, except in the transformer's MLPs
    (``mlp.lin1/lin2`` here and in SAM's, ``mlp.layers.0/1`` in SAM 2's; see
    :func:`segany.modeling.sam2.convert_official_state_dict`).
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
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        use_multimask_token_for_obj_ptr: bool = False,
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
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        self.use_high_res_features = high_res_in_chans is not None
        if high_res_in_chans is not None:
            self.conv_s0 = nn.Conv2d(high_res_in_chans[0], transformer_dim // 8, 1)
            self.conv_s1 = nn.Conv2d(high_res_in_chans[1], transformer_dim // 4, 1)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3)
                if pred_obj_scores_mlp
                else nn.Linear(transformer_dim, 1)
            )
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

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
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Args:
            image_embeddings: (1 or B, C, h, w); a single embedding is shared by all B prompts.
            image_pe: (1, C, h, w) positional encoding of the grid.
            sparse_prompt_embeddings: (B, N, C) prompt tokens.
            dense_prompt_embeddings: (1 or B, C, h, w) mask-prompt embedding.
            multimask_output: return the 3 multimask outputs instead of the single one.
            high_res_features: for a decoder with ``use_high_res_features``, the projected
                features of :meth:`project_high_res`, batch 1 (shared) or B.

        Returns:
            Mask logits (B, 3 or 1, 4h, 4w) and predicted IoU (B, 3 or 1); for a decoder
            with ``dynamic_multimask_via_stability``, the single mask chosen as
            :meth:`decode` does.
        """
        output = self.decode(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            multimask_output,
            high_res_features=high_res_features,
        )
        return output.masks, output.iou_pred

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> MaskDecoderOutput:
        """:meth:`forward` with all of SAM 2's outputs (arguments as there).

        Returns masks (B, 3 or 1, 4h, 4w) and IoU (B, 3 or 1) as :meth:`forward`; the
        tokens for object pointers: the 3 multimask tokens (B, 3, C) for multimask output
        with ``use_multimask_token_for_obj_ptr``, else the single-mask token (B, 1, C)
        (even when the dynamic choice took a multimask output's mask: Meta's rule); and
        the object score logits (B, 1).
        """
        every = self.predict_masks_and_tokens(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features=high_res_features,
        )
        if multimask_output:
            masks, iou_pred = every.masks[:, 1:], every.iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self.stable_single_or_best_multimask(every.masks, every.iou_pred)
        else:
            masks, iou_pred = every.masks[:, :1], every.iou_pred[:, :1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            tokens = every.mask_tokens[:, 1:]
        else:
            tokens = every.mask_tokens[:, :1]
        return MaskDecoderOutput(masks, iou_pred, tokens, every.object_score_logits)

    def stable_single_or_best_multimask(
        self, masks: torch.Tensor, iou_pred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens' masks (B, 4, H, W) and IoU (B, 4) -> one mask (B, 1, H, W) and its
        IoU (B, 1) per prompt set: the single-mask output where its stability score reaches
        ``dynamic_multimask_stability_thresh``, else the multimask output of highest
        predicted IoU (SAM 2's fallback for ambiguous prompts)."""
        rows = torch.arange(masks.shape[0], device=masks.device)
        best = iou_pred[:, 1:].argmax(dim=-1) + 1
        stability = stability_scores(masks[:, 0], self.dynamic_multimask_stability_delta)
        stable = stability >= self.dynamic_multimask_stability_thresh
        chosen = torch.where(stable, 0, best)
        return masks[rows, chosen].unsqueeze(1), iou_pred[rows, chosen].unsqueeze(1)

    def check_high_res(self, high_res_features: list[torch.Tensor] | None) -> None:
        """Raise ValueError unless high-resolution features are given exactly when this
        decoder uses them."""
        if self.use_high_res_features != (high_res_features is not None):
            raise ValueError(
                "this decoder needs high_res_features (see project_high_res)"
                if self.use_high_res_features
                else "this decoder takes no high_res_features"
            )

    def output_tokens(self, batch: int) -> torch.Tensor:
        """The IoU token, the mask tokens and, with ``pred_obj_scores``, the object-score
        token, for ``batch`` prompt sets: (B, 1 + M [+ 1], C).

        SAM 2 puts the object-score token first. It goes last here, so that the IoU and
        mask tokens keep SAM's indices (those :mod:`segany.inference` reads): the
        transformer treats its tokens alike whatever their order (its attention has no
        token positions), so the outputs are the same up to float rounding.
        """
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            weights.append(self.obj_score_token.weight)
        return torch.cat(weights, dim=0).unsqueeze(0).expand(batch, -1, -1)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B, num_mask_tokens, 4h, 4w) and IoU predictions (B, num_mask_tokens) of
        all mask tokens (arguments as in :meth:`forward`)."""
        every = self.predict_masks_and_tokens(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features=high_res_features,
        )
        return every.masks, every.iou_pred

    def predict_masks_and_tokens(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> MaskDecoderOutput:
        """The outputs of all mask tokens: masks (B, num_mask_tokens, 4h, 4w), IoU
        (B, num_mask_tokens), mask tokens (B, num_mask_tokens, C) and object score logits
        (B, 1) (arguments as in :meth:`forward`)."""
        self.check_high_res(high_res_features)
        batch = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets; "
                "give one embedding or one per prompt set"
            )
        output_tokens = self.output_tokens(batch).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        height, width = image_embeddings.shape[-2:]
        src = src.transpose(1, 2).reshape(batch, self.transformer_dim, height, width)
        upscaled = self.upscale(src, high_res_features)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        masks = (hyper_in @ upscaled.flatten(2)).view(batch, -1, *upscaled.shape[-2:])
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 1 + self.num_mask_tokens])
        else:
            object_score_logits = iou_pred.new_full((batch, 1), 10.0)
        return MaskDecoderOutput(masks, iou_pred, mask_tokens_out, object_score_logits)

    def upscale(
        self, src: torch.Tensor, high_res_features: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Transformer output (B, C, h, w) -> mask features (B, C / 8, 4h, 4w); the
        projected high-resolution features (batch 1 or B) are added after each transposed
        convolution, as in SAM 2."""
        if high_res_features is None:
            return self.output_upscaling(src)
        first, norm, act1, second, act2 = self.output_upscaling
        fine, medium = high_res_features
        upscaled = act1(norm(first(src) + medium))
        return act2(second(upscaled) + fine)

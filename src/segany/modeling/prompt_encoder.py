"""SAM's prompt encoder: points, boxes and a coarse mask to decoder tokens.

Coordinates given to this module are in the model's input frame: pixels of the
resized, padded image (``input_image_size``, 1024 x 1024 for SAM), x then y.
Point labels: 1 foreground, 0 background, -1 padding ("not a point"),
2 / 3 top-left / bottom-right box corner (as in the official ONNX export).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d

NOT_A_POINT = -1


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random Fourier features (Tancik et al. 2020).

    Maps normalised (x, y) in [0, 1] to ``2 * num_pos_feats`` sin/cos features.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1] -> (..., 2 * num_pos_feats) features."""
        projected = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * projected
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centre of every cell of an (h, w) grid: (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Encode (B, N, 2) pixel coordinates (x, y) of an image of ``image_size`` (h, w)."""
        # Divide in the input's dtype (float64 from the official generator), as the official code.
        size = torch.tensor([image_size[1], image_size[0]], device=coords_input.device)
        return self._encode((coords_input / size.to(coords_input.dtype)).float())


class PromptEncoder(nn.Module):
    """Embeds prompts for :class:`~segany.modeling.mask_decoder.MaskDecoder`.

    Args:
        embed_dim: token dimension.
        image_embedding_size: (h, w) of the image embedding (64, 64 for SAM).
        input_image_size: (H, W) of the padded model input (1024, 1024 for SAM).
        mask_in_chans: hidden channels of the mask downscaler.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Index 0 background, 1 foreground, 2 box top-left, 3 box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) points and (B, N) labels -> (B, N [+1], C) tokens."""
        points = points + 0.5  # pixel centres
        if pad:
            # Without a box, SAM appends one "not a point" token.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), NOT_A_POINT)], dim=1)
        encoding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        type_table = torch.cat([e.weight for e in self.point_embeddings], dim=0)
        type_embedding = type_table[labels.clamp(min=0).long()]
        is_padding = (labels == NOT_A_POINT).unsqueeze(-1)
        return torch.where(
            is_padding,
            self.not_a_point_embed.weight.to(encoding.dtype).expand_as(encoding),
            encoding + type_embedding,
        )

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) XYXY boxes -> (B, 2, C) corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        encoding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0
        )
        return encoding + corner_types

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4h, 4w) mask logits -> (B, C, h, w)."""
        return self.mask_downscaling(masks)

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of prompts.

        Args:
            points: (B, N, 2) coordinates and (B, N) labels, or None.
            boxes: (B, 4) XYXY boxes, or None.
            masks: (B, 1, 4h, 4w) low-resolution mask logits, or None.

        Returns:
            Sparse tokens (B, N', C) and dense embedding (B, C, h, w).
        """
        batch = self._batch_size(points, boxes, masks)
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty((batch, 0, self.embed_dim), device=device)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense_embeddings = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch, -1, h, w
            )
        return sparse_embeddings, dense_embeddings

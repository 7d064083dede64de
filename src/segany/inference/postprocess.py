"""SAM's mask post-processing for the predictor, in one pass per axis.

The model's :func:`~segany.modeling.sam.upscale_logits` is the official post-processing
bit for bit (the automatic mask generator keeps it: its masks must equal the official
generator's); :func:`upscale_logits_fast` computes the same up to float rounding, faster.
The banded maps it builds depend only on the sizes and are kept for the 32 last used.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..modeling.sam import upscale_logits

# Output samples per block of the banded resize: each block is one small dense product.
RESIZE_BLOCK = 32


@functools.lru_cache(maxsize=32)
def _resize_blocks(
    source: int, factor: int, crop: int, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of SAM's post-processing as blocks of a banded linear map from ``source``
    samples: upscale by ``factor``, keep the first ``crop``, resize to ``target`` (all
    bilinear, ``align_corners=False``).

    Returns (K, width) source indices and (K, RESIZE_BLOCK, width) weights: output samples
    ``k * RESIZE_BLOCK + r`` are ``blocks[k, r] . source[index[k]]`` (the last block is
    padded with zero rows).
    """
    # The map's matrix, from the same interpolations applied to each source basis vector.
    basis = torch.eye(source).unsqueeze(0)
    upscaled = F.interpolate(basis, source * factor, mode="linear", align_corners=False)
    matrix = F.interpolate(upscaled[..., :crop], target, mode="linear", align_corners=False)
    count = -(-target // RESIZE_BLOCK)
    matrix = F.pad(matrix[0].T, (0, 0, 0, count * RESIZE_BLOCK - target))  # (blocks x B, S)
    rows = matrix.view(count, RESIZE_BLOCK, source)
    used = rows.ne(0).any(dim=1)  # (K, S): the source samples each block reads
    first = used.int().argmax(dim=1)
    last = source - 1 - used.flip(1).int().argmax(dim=1)
    width = int((last - first).max()) + 1
    index = first.clamp(max=source - width)[:, None] + torch.arange(width)
    return index, rows.gather(2, index[:, None, :].expand(-1, RESIZE_BLOCK, -1))


def upscale_logits_fast(
    low_res: torch.Tensor,
    model_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """:func:`upscale_logits` in one pass per axis, equal up to float rounding (~1e-7).

    The two bilinear resizes (to the padded model input, then from its image part to the
    original size) compose into one banded map per axis, so the (model_size)² intermediate
    is never made. Each axis runs as small dense products, one per block of 32 output
    samples against the few source samples the block reads: columns first, on the small
    low-res grid, then rows, which writes the output once and in order. 2-4x faster than
    :func:`upscale_logits` for photos up to a few megapixels, as fast for larger ones. The
    predictor uses it; the automatic mask generator keeps the bit-exact form, whose masks
    must equal the official generator's.

    Args:
        low_res: (B, C, s, s) logits, s = model_size / 4 for SAM.

    Returns:
        (B, C, H, W) logits, H, W = ``original_size``.
    """
    side = low_res.shape[-1]
    factor = model_size // side
    if low_res.shape[-2] != side or factor * side != model_size:
        return upscale_logits(low_res, model_size, input_size, original_size)
    height, width = original_size
    rows, cols = (
        _on(low_res, *_resize_blocks(side, factor, c, o)) for c, o in zip(input_size, original_size)
    )
    x = low_res.flatten(0, 1)  # (N, s, s)
    count, reads = cols[0].shape
    # (N, s, K, reads) -> (N, K, s, reads) @ (K, reads, block) -> (N, s, K x block)
    windows = x.index_select(2, cols[0].flatten()).view(-1, side, count, reads).transpose(1, 2)
    x = (windows @ cols[1].mT).transpose(1, 2).flatten(2)[..., :width]
    count, reads = rows[0].shape
    # (K, block, reads) @ (N, K, reads, W) -> (N, K x block, W)
    windows = x.index_select(1, rows[0].flatten()).view(-1, count, reads, width)
    x = (rows[1] @ windows).flatten(1, 2)[:, :height]
    return x.reshape(*low_res.shape[:2], height, width)


def _on(
    like: torch.Tensor, index: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize blocks on ``like``'s device, the weights in its dtype."""
    return index.to(like.device), weight.to(like.device, like.dtype)


def downscale_logits(
    logits: torch.Tensor,
    model_size: int,
    input_size: tuple[int, int],
    low_res_size: tuple[int, int],
) -> torch.Tensor:
    """The way back of :func:`upscale_logits`: mask logits of the original image into the
    model's low-res frame, as ``mask_input`` takes them.

    Resizes to ``input_size`` (the image's part of the padded model input), pads to
    ``model_size`` with each mask's lowest logit (the padding holds no object) and resizes
    to ``low_res_size``; bilinear, antialiased where it shrinks.

    Args:
        logits: (B, C, H, W) logits, H, W = the original image's size.

    Returns:
        (B, C, h, w) logits, (h, w) = ``low_res_size``.
    """
    height, width = input_size
    resized = F.interpolate(
        logits, (height, width), mode="bilinear", align_corners=False, antialias=True
    )
    lowest = resized.amin(dim=(-2, -1), keepdim=True)
    padded = lowest.expand(*resized.shape[:2], model_size, model_size).clone()
    padded[..., :height, :width] = resized
    return F.interpolate(
        padded, tuple(low_res_size), mode="bilinear", align_corners=False, antialias=True
    )

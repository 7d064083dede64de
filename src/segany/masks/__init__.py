"""Mask utilities for automatic mask generation: NMS, boxes, crops, point grids and RLE.

The files they are written to (SA-1B JSON, COCO instances, ``amg.py`` PNG folders) are
:mod:`segany.masks.formats`.

Conventions used throughout:

* coordinates are pixels of the original image, x then y;
* boxes are XYXY internally. Boxes computed from masks are *inclusive*: ``x1``/``y1`` is the
  last column/row that contains the mask (the official SAM convention), so a single-pixel
  mask at (x, y) has box ``[x, y, x, y]``. Crop boxes are half-open: ``[x0, y0, x1, y1]``
  covers columns ``x0 .. x1 - 1``;
* an uncompressed RLE is ``{"size": [h, w], "counts": [n0, n1, ...]}`` over the mask read
  column by column (Fortran order), starting with a run of zeros (possibly of length 0), the
  format pycocotools' ``frPyObjects`` accepts.
"""

from __future__ import annotations

import math
import warnings
from itertools import product
from typing import Any, Literal

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

UncompressedRLE = dict[str, Any]
CocoRLE = dict[str, Any]


# --------------------------------------------------------------------------------------
# Boxes and NMS
# --------------------------------------------------------------------------------------


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas (N,) of XYXY boxes (N, 4), computed as (x1 - x0) * (y1 - y0)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_one_to_many(
    box: torch.Tensor, area: torch.Tensor, others: torch.Tensor, other_areas: torch.Tensor
) -> torch.Tensor:
    """IoU (M,) of one XYXY box (4,) with boxes (M, 4); 0/0 gives NaN (never suppresses)."""
    w = (torch.minimum(box[2], others[:, 2]) - torch.maximum(box[0], others[:, 0])).clamp(min=0)
    h = (torch.minimum(box[3], others[:, 3]) - torch.maximum(box[1], others[:, 1])).clamp(min=0)
    inter = w * h
    return inter / (area + other_areas - inter)


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    categories: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """Greedy non-maximum suppression per category, torchvision ``batched_nms`` semantics.

    Boxes are visited by descending score (ties keep input order); a box is dropped when its
    IoU with an already kept box of the same category is ``> iou_threshold``.

    Args:
        boxes: (N, 4) XYXY boxes, floating point.
        scores: (N,) scores.
        categories: (N,) integer category of each box; categories never suppress each other.
        iou_threshold: IoU above which the lower-scored box is removed.

    Returns:
        (K,) int64 indices into ``boxes`` of the kept boxes, by descending score.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order]
    categories = categories.to(boxes.device)[order]
    areas = box_area(boxes)
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    i = 0
    # One vectorised pass per *kept* box; suppressed boxes are skipped without work.
    while True:
        keep.append(i)
        rest = slice(i + 1, n)
        iou = _iou_one_to_many(boxes[i], areas[i], boxes[rest], areas[rest])
        suppressed[rest] |= (iou > iou_threshold) & (categories[rest] == categories[i])
        alive = torch.nonzero(~suppressed[rest])
        if alive.numel() == 0:
            break
        i += 1 + int(alive[0, 0])
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def _first_last(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last True index along the last dim of (..., L) bool (garbage if none)."""
    length = occupied.shape[-1]
    idx = torch.arange(length, device=occupied.device)
    first = torch.where(occupied, idx, length).amin(dim=-1)
    last = torch.where(occupied, idx, -1).amax(dim=-1)
    return first, last


def _as_bytes(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks (bool, or any dtype: nonzero is True) as a uint8 view of 0s and 1s."""
    return (masks if masks.dtype == torch.bool else masks != 0).view(torch.uint8)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY boxes around binary masks.

    Args:
        masks: (..., H, W) bool masks.

    Returns:
        (..., 4) int64 boxes ``[x_min, y_min, x_max, y_max]`` (last occupied column/row);
        ``[0, 0, 0, 0]`` for an empty mask.
    """
    h, w = masks.shape[-2:]
    if h == 0 or w == 0:
        return torch.zeros((*masks.shape[:-2], 4), dtype=torch.int64, device=masks.device)
    # Maxima over bytes: ~4x faster than torch's boolean any() on a CPU.
    flags = _as_bytes(masks)
    rows = flags.amax(dim=-1).bool()  # (..., H)
    cols = flags.amax(dim=-2).bool()  # (..., W)
    x0, x1 = _first_last(cols)
    y0, y1 = _first_last(rows)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    empty = ~rows.any(dim=-1)
    return boxes.masked_fill(empty.unsqueeze(-1), 0).to(torch.int64)


def box_xyxy_to_xywh(boxes: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """(..., 4) XYXY -> (..., 4) XYWH with ``w = x1 - x0`` (no +1, as the official records)."""
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
    out[..., 2:] = boxes[..., 2:] - boxes[..., :2]
    return out


def boxes_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], image_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Which boxes touch a crop's edge that is not also the image's edge.

    Masks cut by a crop edge are incomplete, so the generator drops them.

    Args:
        boxes: (N, 4) XYXY boxes in the crop's frame.
        crop_box: XYXY crop box in the image frame.
        image_box: ``[0, 0, W, H]`` of the image.
        atol: distance in pixels within which a side counts as touching.

    Returns:
        (N,) bool.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float32, device=boxes.device)
    in_image = boxes.float() + crop[[0, 1, 0, 1]]
    near_crop = (in_image - crop).abs() <= atol
    near_image = (in_image - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


# --------------------------------------------------------------------------------------
# Scores, grids and crops
# --------------------------------------------------------------------------------------


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks obtained by thresholding at ``mask_threshold ± offset``.

    The high-threshold mask lies inside the low-threshold one, so IoU = area_hi / area_lo.

    Args:
        logits: (..., H, W) mask logits.

    Returns:
        (...) float32 scores; NaN when the low-threshold mask is empty.
    """
    hi = count_true(logits > mask_threshold + offset)
    lo = count_true(logits > mask_threshold - offset)
    return hi / lo


def count_true(masks: torch.Tensor) -> torch.Tensor:
    """(...) numbers of True pixels of (..., H, W) bool masks (an integer dtype).

    On a CPU, numpy's count of set bytes (vectorised) is ~25x faster than torch's sum of
    a boolean tensor; elsewhere, and in traced or exported graphs, torch sums.
    """
    graph = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if graph or type(masks) is not torch.Tensor or masks.device.type != "cpu":
        return masks.sum(dim=(-2, -1), dtype=torch.int32)
    if masks.numel() == 0:
        return torch.zeros(masks.shape[:-2], dtype=torch.int64)
    flat = masks.reshape(-1, masks.shape[-2] * masks.shape[-1]).numpy()
    counts = np.fromiter((np.count_nonzero(row) for row in flat), np.int64, len(flat))
    return torch.from_numpy(counts).view(masks.shape[:-2])


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) float64 points at the centres of an n x n grid of cells in [0, 1]², x then y.

    Points run along x first (row-major over the grid).
    """
    half_cell = 1 / (2 * n_per_side)
    ticks = np.linspace(half_cell, 1 - half_cell, n_per_side)
    xs, ys = np.meshgrid(ticks, ticks, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_layer_point_grids(
    n_per_side: int, n_layers: int, downscale_factor: int
) -> list[np.ndarray]:
    """Point grids for crop layers 0..n_layers; layer i has ``int(n / factor**i)`` per side."""
    return [
        build_point_grid(int(n_per_side / downscale_factor**layer)) for layer in range(n_layers + 1)
    ]


def _crop_length(image_length: int, n_crops: int, overlap: int) -> int:
    """Length of each of ``n_crops`` crops that cover the side with ``overlap`` pixels shared."""
    return math.ceil((overlap * (n_crops - 1) + image_length) / n_crops)


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes for all layers: layer 0 is the full image, layer i has (2**i)² crops.

    Args:
        image_size: (H, W) of the image.
        n_layers: number of crop layers beyond the full image.
        overlap_ratio: overlap of neighbouring first-layer crops as a fraction of the short
            side; deeper layers scale it down with the crop size.

    Returns:
        Half-open XYXY integer boxes and the layer index of each box. Within a layer, crops
        are ordered by x0 then y0.
    """
    h, w = image_size
    boxes = [[0, 0, w, h]]
    layers = [0]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * min(h, w) * (2 / per_side))
        crop_w = _crop_length(w, per_side, overlap)
        crop_h = _crop_length(h, per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)])
            layers.append(layer)
    return boxes, layers


# --------------------------------------------------------------------------------------
# Run-length encoding
# --------------------------------------------------------------------------------------


def masks_to_rle(
    masks: torch.Tensor,
    image_size: tuple[int, int] | None = None,
    offset: tuple[int, int] = (0, 0),
) -> list[UncompressedRLE]:
    """Uncompressed RLEs of a batch of binary masks, computed in one vectorised pass.

    A mask may be a crop of a larger, otherwise empty image: the RLE is then that of the
    full image, without ever building the full-size mask.

    Args:
        masks: (B, h, w) bool masks.
        image_size: (H, W) of the image the masks lie in; defaults to (h, w).
        offset: (x0, y0) of the masks' top-left pixel in that image.

    Returns:
        B dicts ``{"size": [H, W], "counts": [...]}``; counts alternate zero/one runs over
        the column-major pixels, starting with the (possibly empty) run of zeros.
    """
    b, h, w = masks.shape
    big_h, big_w = image_size if image_size is not None else (h, w)
    x0, y0 = offset
    if x0 < 0 or y0 < 0 or x0 + w > big_w or y0 + h > big_h:
        raise ValueError(f"a {w}x{h} mask at {offset} does not fit in a {big_w}x{big_h} image")
    # Column-major (as COCO) with a zero row above and below every column, so each one-run
    # starts and ends inside its own column.
    # As bytes: copying and comparing them is ~2x faster than as booleans.
    col_len = h + 2
    padded = torch.zeros((b, w, col_len), dtype=torch.uint8, device=masks.device)
    padded[:, :, 1:-1] = _as_bytes(masks).transpose(1, 2)
    flat = padded.reshape(b, w * col_len)
    mask_idx, pos = torch.nonzero(flat[:, 1:] ^ flat[:, :-1], as_tuple=True)
    k = pos + 1  # first element after each change: a run's first one or its first zero
    bounds = (x0 + k // col_len) * big_h + y0 + k % col_len - 1
    # A run reaching the bottom of a full-height column continues at the top of the next
    # one; its end and the next start coincide and must vanish.
    joined = (bounds[1:] == bounds[:-1]) & (mask_idx[1:] == mask_idx[:-1])
    # A run ending at the image's last pixel ends with the image: no boundary there.
    drop = bounds == big_h * big_w
    drop[:-1] |= joined
    drop[1:] |= joined
    bounds, mask_idx = bounds[~drop], mask_idx[~drop]
    return _rles_from_bounds(bounds, mask_idx, b, (big_h, big_w))


def _rles_from_bounds(
    bounds: torch.Tensor, mask_idx: torch.Tensor, n_masks: int, size: tuple[int, int]
) -> list[UncompressedRLE]:
    """RLEs from run boundaries (K,) (flat column-major indices, sorted within each mask)
    and the mask (K,) each belongs to; a mask's counts are the gaps 0 -> bounds -> H*W."""
    bounds, mask_idx = bounds.cpu(), mask_idx.cpu()
    n = torch.bincount(mask_idx, minlength=n_masks)
    # Mask m owns n[m] + 2 slots: 0, its boundaries, H*W.
    slot_end = torch.cumsum(n + 2, 0)
    slot_start = slot_end - (n + 2)
    slots = torch.full((int(slot_end[-1]) if n_masks else 0,), size[0] * size[1], dtype=torch.int64)
    slots[slot_start] = 0
    slots[torch.arange(bounds.numel()) + 1 + 2 * mask_idx] = bounds
    gaps = (slots[1:] - slots[:-1]).tolist()
    return [
        {"size": list(size), "counts": gaps[lo : lo + count + 1]}
        for lo, count in zip(slot_start.tolist(), n.tolist(), strict=True)
    ]


def rle_to_mask(rle: UncompressedRLE) -> np.ndarray:
    """(H, W) bool mask decoded from an uncompressed RLE."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = (np.arange(counts.size) % 2).astype(bool)
    return np.repeat(values, counts).reshape(w, h).T


def rle_area(rle: UncompressedRLE) -> int:
    """Number of foreground pixels: the sum of the odd (one-valued) runs."""
    return int(sum(rle["counts"][1::2]))


def rle_to_coco(rle: UncompressedRLE) -> CocoRLE:
    """Compressed COCO RLE (``counts`` as str, so it is JSON-serialisable)."""
    h, w = rle["size"]
    coco = mask_utils.frPyObjects(rle, h, w)
    return {"size": [int(s) for s in coco["size"]], "counts": coco["counts"].decode("ascii")}


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= least


def check_rle(rle: Any) -> UncompressedRLE:
    """``rle`` as a valid uncompressed RLE: positive ``size`` [h, w] and non-negative integer
    ``counts`` that add up to h * w. Raises ValueError naming the problem.

    pycocotools trusts the counts it is given (counts adding up to more than h * w write past
    its buffer), so RLEs from outside (files, web requests) are checked here first.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError('an RLE must be an object with "size" [height, width] and "counts"')
    size, counts = rle["size"], rle["counts"]
    if not isinstance(size, list | tuple) or len(size) != 2 or not all(_count(v, 1) for v in size):
        raise ValueError(f"RLE size must be two positive integers [height, width], got {size}")
    if not isinstance(counts, list | tuple) or not all(_count(v, 0) for v in counts):
        raise ValueError("RLE counts must be non-negative integers")
    if sum(counts) != size[0] * size[1]:
        raise ValueError(
            f"RLE counts add up to {sum(counts)} pixels, not {size[0]} x {size[1]} = "
            f"{size[0] * size[1]}"
        )
    return {"size": [int(size[0]), int(size[1])], "counts": [int(v) for v in counts]}


def coco_to_rle(rle: CocoRLE) -> UncompressedRLE:
    """Uncompressed RLE of a compressed COCO RLE (``counts`` str or bytes), checked as
    :func:`check_rle` does; the inverse of :func:`rle_to_coco`.

    Each count is stored as 5-bit groups (``chr(48 + group)``, 0x20 = more groups follow,
    0x10 in the last group = negative); counts after the second are differences to the
    count two before, as pycocotools' ``rleToString`` writes them.
    """
    text = rle.get("counts") if isinstance(rle, dict) else None
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise ValueError("a compressed RLE needs a string of counts")
    counts: list[int] = []
    value = shift = 0
    for char in text:
        group = ord(char) - 48
        if not 0 <= group < 64 or shift > 60:
            raise ValueError(f"RLE counts string is malformed near {char!r}")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value = shift = 0
    if shift:
        raise ValueError("RLE counts string ends in the middle of a number")
    return check_rle({"size": rle.get("size"), "counts": counts})


def pycoco_rle(rle: CocoRLE) -> dict[str, Any]:
    """The compressed RLE with bytes ``counts``, as pycocotools' C functions want it."""
    counts = rle["counts"]
    return {
        "size": list(rle["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }


def coco_to_mask(rle: CocoRLE) -> np.ndarray:
    """(H, W) bool mask decoded from a compressed COCO RLE (``counts`` str or bytes)."""
    with warnings.catch_warnings():
        # pycocotools' decoder trips a harmless NumPy 2 deprecation on every call.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(pycoco_rle(rle)).astype(bool)


def coco_bbox(rle: CocoRLE) -> list[float]:
    """COCO XYWH box of a compressed RLE (pycocotools ``toBbox``: ``w`` counts pixels)."""
    return [float(v) for v in mask_utils.toBbox(pycoco_rle(rle))]


# --------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------


def remove_small_regions(
    mask: np.ndarray, min_area: float, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fill holes or drop islands smaller than ``min_area`` pixels (8-connectivity).

    In ``"islands"`` mode, if every island is small the largest one is kept so the mask never
    becomes empty.

    Args:
        mask: (H, W) bool mask.

    Returns:
        The (H, W) bool mask and whether it changed.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    fill_holes = mode == "holes"
    # Holes are the islands of the complement.
    work = (mask != fill_holes).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < min_area
    if not small.any():
        return mask, False
    keep_label = np.zeros(n_labels, dtype=bool)  # label 0 is the complement of `work`
    if fill_holes:
        keep_label[0] = True
        keep_label[1:] = small
    else:
        keep_label[1:] = ~small
        if not keep_label.any():
            keep_label[1 + int(np.argmax(sizes))] = True
    return keep_label[labels], True


def remove_small_logit_regions(
    logits: torch.Tensor, max_area: int, threshold: float = 0.0, shift: float = 10.0
) -> torch.Tensor:
    """SAM 2's clean-up of low-res mask logits (its image predictor's ``max_hole_area``
    and ``max_sprinkle_area``): holes, 8-connected regions of pixels at or below
    ``threshold`` with at most ``max_area`` pixels, get the logit ``threshold + shift``;
    specks, such regions above it, get ``threshold - shift``. Both are found in the
    logits as given (a region touching the border counts too).

    Args:
        logits: (M, h, w) float mask logits.

    Returns:
        (M, h, w) cleaned logits (a new tensor).
    """
    cleaned = logits.clone()
    for plane, out in zip(logits.detach().cpu().numpy(), cleaned, strict=True):
        for region, value in (
            (plane <= threshold, threshold + shift),
            (plane > threshold, threshold - shift),
        ):
            _, labels, stats, _ = cv2.connectedComponentsWithStats(
                region.astype(np.uint8), connectivity=8
            )
            small = stats[:, cv2.CC_STAT_AREA] <= max_area
            small[0] = False  # label 0: the pixels outside ``region``
            if small.any():
                out[torch.from_numpy(small[labels]).to(out.device)] = value
    return cleaned

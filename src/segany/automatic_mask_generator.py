"""Segment everything: masks for a grid of point prompts over the image and its crops.

:class:`SamAutomaticMaskGenerator` is a drop-in for the official
``SamAutomaticMaskGenerator`` (same options, defaults and records, and the same masks and
scores for the same weights). It differs only in how the work is done: masks are filtered
by predicted IoU before they are upscaled, upscaled and thresholded in chunks, run-length
encoded in one vectorised pass straight from the crop (no full-size copy), and the
prompt-independent inputs of the mask decoder are computed once per crop.

:class:`GridMaskGenerator` is that machinery (crops, point grids, filters, NMS, RLE,
records), shared with SAM 2's generator
(:class:`~segany.sam2_automatic_mask_generator.Sam2AutomaticMaskGenerator`); a family
says how a batch of points is decoded and how its low-res masks are upscaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch

from segany.amg_options import AmgOptions
from segany.inputs import check_image
from segany.masks import (
    UncompressedRLE,
    batched_nms,
    box_area,
    box_xyxy_to_xywh,
    boxes_near_crop_edge,
    generate_crop_boxes,
    masks_to_boxes,
    masks_to_rle,
    remove_small_regions,
    rle_area,
    rle_to_coco,
    rle_to_mask,
    stability_score,
)
from segany.modeling import Sam
from segany.modeling.sam import upscale_logits
from segany.predictor import SamPredictor

# Masks upscaled to full resolution at a time: bounds memory (each is ~4 MB at 1024²).
UPSCALE_CHUNK = 16


@dataclass
class MaskCandidates:
    """Masks found so far and their data, one row per mask (N of them).

    Attributes:
        rles: N uncompressed RLEs in the original image.
        boxes: (N, 4) int64 inclusive XYXY boxes in the original image.
        iou_preds: (N,) float32 predicted IoU.
        stability: (N,) float32 stability scores.
        points: (N, 2) prompt points (x, y) in the original image (float64 for SAM,
            float32 for SAM 2, as the official generators keep them).
        crop_boxes: (N, 4) int64 half-open XYXY crop each mask was found in.
    """

    rles: list[UncompressedRLE]
    boxes: torch.Tensor
    iou_preds: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    crop_boxes: torch.Tensor

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, keep: torch.Tensor) -> MaskCandidates:
        """Rows ``keep`` ((K,) indices or (N,) bool), in that order."""
        index = torch.nonzero(keep).flatten() if keep.dtype == torch.bool else keep
        rows = index.tolist()
        return MaskCandidates(
            rles=[self.rles[i] for i in rows],
            **{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "rles"},
        )

    @staticmethod
    def concat(parts: Sequence[MaskCandidates]) -> MaskCandidates:
        """All rows of ``parts``, in order (``parts`` must not be empty)."""
        return MaskCandidates(
            rles=[rle for part in parts for rle in part.rles],
            **{
                f.name: torch.cat([getattr(part, f.name) for part in parts])
                for f in fields(MaskCandidates)
                if f.name != "rles"
            },
        )


def checked_options(options_class: type[AmgOptions], arguments: dict[str, Any]) -> AmgOptions:
    """A generator's options from its constructor's ``arguments`` (its ``locals()``): the
    arguments named as ``options_class``'s options, checked in one place (SeganyError
    naming the first bad one)."""
    return options_class(**{spec.name: arguments[spec.name] for spec in options_class.specs()})


class GridMaskGenerator:
    """Masks for everything in an image from a grid of point prompts: the machinery that
    SAM's and SAM 2's generators share (see the module documentation).

    A subclass sets it up with :meth:`_setup` and supplies :meth:`_decode` (a batch of
    points to low-res logits and predicted IoU), :meth:`_upscale` (low-res logits to
    logits over the crop), :meth:`_reset_image` and ``mask_threshold``; its options are
    those of its :class:`AmgOptions` (sub)class, kept as attributes of the same names.
    """

    # The dtype of the prompt points in the records (the official generators differ).
    point_dtype: ClassVar[torch.dtype] = torch.float64
    options: AmgOptions
    point_grids: list[np.ndarray]
    predictor: Any
    mask_threshold: float
    points_per_batch: int
    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    box_nms_thresh: float
    crop_n_layers: int
    crop_nms_thresh: float
    crop_overlap_ratio: float
    crop_n_points_downscale_factor: int
    min_mask_region_area: int
    output_mode: str

    def _setup(self, predictor: Any, options: AmgOptions) -> None:
        """Run on ``predictor`` with checked ``options``; each option (but
        ``point_grids``: the per-layer grids) becomes an attribute, as the official
        generators keep them."""
        self.options = options
        self.point_grids = options.layer_point_grids()
        self.predictor = predictor
        for spec in options.specs():
            if spec.name not in ("points_per_side", "point_grids"):
                setattr(self, spec.name, getattr(options, spec.name))

    # -- what a family supplies ---------------------------------------------------------

    def _decode(
        self, points: torch.Tensor, crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, C, h, w) and predicted IoU (B, C) of C masks for each of B
        single-point prompts, (B, 2) (x, y) pixels of the crop set on the predictor."""
        raise NotImplementedError

    def _upscale(self, low_res: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
        """(M, h, w) low-res logits -> (M, H, W) logits over the (H, W) crop."""
        raise NotImplementedError

    def _reset_image(self) -> None:
        """Forget the crop set on the predictor."""
        raise NotImplementedError

    def _postprocess(self, candidates: MaskCandidates) -> MaskCandidates:
        """The last step before the records (none by default)."""
        return candidates

    @property
    def model(self) -> Any:
        return self.predictor.model

    # -- public API -------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for everything in ``image``.

        Args:
            image: (H, W, 3) uint8 RGB image.

        Returns:
            One record per mask: ``segmentation`` (per ``output_mode``), ``area`` (pixels),
            ``bbox`` (XYWH, inclusive corners: ``w = x_max - x_min``), ``predicted_iou``,
            ``point_coords`` ([[x, y]] prompt), ``stability_score`` and ``crop_box`` (XYWH).
        """
        check_image(image, "RGB")
        return self.records(self._postprocess(self.generate_candidates(image)))

    def records(self, candidates: MaskCandidates) -> list[dict[str, Any]]:
        """Output records (see :meth:`generate`) for ``candidates``."""
        encode = {
            "binary_mask": rle_to_mask,
            "uncompressed_rle": lambda rle: rle,
            "coco_rle": rle_to_coco,
        }[self.output_mode]
        boxes = box_xyxy_to_xywh(candidates.boxes).tolist()
        crop_boxes = box_xyxy_to_xywh(candidates.crop_boxes).tolist()
        return [
            {
                "segmentation": encode(rle),
                "area": rle_area(rle),
                "bbox": box,
                "predicted_iou": iou,
                "point_coords": [point],
                "stability_score": stability,
                "crop_box": crop_box,
            }
            for rle, box, iou, point, stability, crop_box in zip(
                candidates.rles,
                boxes,
                candidates.iou_preds.tolist(),
                candidates.points.tolist(),
                candidates.stability.tolist(),
                crop_boxes,
                strict=True,
            )
        ]

    # -- crops ------------------------------------------------------------------------

    def generate_candidates(self, image: np.ndarray) -> MaskCandidates:
        """All masks over the image and its crops, after within- and across-crop NMS.

        Rows are ordered as the official generator orders them: crops in
        :func:`generate_crop_boxes` order, within a crop by descending predicted IoU; after
        the cross-crop NMS, by descending 1 / crop area.
        """
        image_size = (int(image.shape[0]), int(image.shape[1]))
        crop_boxes, layers = generate_crop_boxes(
            image_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        candidates = MaskCandidates.concat(
            [
                self._process_crop(image, crop_box, layer)
                for crop_box, layer in zip(crop_boxes, layers, strict=True)
            ]
        )
        if len(crop_boxes) > 1 and len(candidates) > 0:
            # Prefer masks from smaller crops: they saw the object at higher resolution.
            scores = 1 / box_area(candidates.crop_boxes)
            keep = batched_nms(
                candidates.boxes.float(),
                scores,
                torch.zeros(len(candidates), dtype=torch.int64),
                self.crop_nms_thresh,
            )
            candidates = candidates.select(keep)
        return candidates

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int) -> MaskCandidates:
        """Masks from one crop (half-open XYXY ``crop_box``), after NMS within the crop."""
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        self.predictor.set_image(crop)
        # Grid points scaled to the crop's pixels, x then y.
        grid = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
        points = torch.as_tensor(grid, dtype=self.point_dtype)
        parts = [
            self._process_batch(points[start : start + self.points_per_batch], crop_box, image)
            for start in range(0, len(points), self.points_per_batch)
        ]
        self._reset_image()
        candidates = MaskCandidates.concat(parts)
        offset = torch.tensor([x0, y0, x0, y0])
        keep = batched_nms(
            candidates.boxes.float(),
            candidates.iou_preds,
            torch.zeros(len(candidates), dtype=torch.int64),
            self.box_nms_thresh,
        )
        candidates = candidates.select(keep)
        # Boxes and points were in the crop's frame until now.
        candidates.boxes = candidates.boxes + offset
        candidates.points = candidates.points + offset[:2]
        candidates.crop_boxes = torch.tensor([crop_box], dtype=torch.int64).expand(len(keep), 4)
        return candidates

    # -- point batches ----------------------------------------------------------------

    def _min_iou(self) -> float | None:
        """The IoU below which the decoder may leave a prompt set's masks out: the
        generator drops masks under pred_iou_thresh anyway, and skipping the upscaling of
        the sets with none above it spares most of their decode."""
        return self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None

    def _process_batch(
        self,
        points: torch.Tensor,
        crop_box: list[int],
        image: np.ndarray,
    ) -> MaskCandidates:
        """Masks for a batch of (B, 2) crop-pixel points that pass the quality filters.

        Rows are point-major (the C masks of point 0, then of point 1, ...). Boxes and
        points stay in the crop's frame; RLEs are already in the image's frame; crop boxes
        are left for :meth:`_process_crop` to fill.
        """
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        low_res, iou_preds = self._decode(points, crop_size)
        n_out = low_res.shape[1]
        low_res, iou_preds = low_res.flatten(0, 1), iou_preds.flatten(0, 1)
        point_rows = points.repeat_interleave(n_out, dim=0)
        # The IoU filter needs no upscaling, so it runs first and spares most of that work.
        if self.pred_iou_thresh > 0.0:
            keep = torch.nonzero(iou_preds > self.pred_iou_thresh).flatten()
            low_res, iou_preds, point_rows = low_res[keep], iou_preds[keep], point_rows[keep.cpu()]
        masks, stability, keep = self._threshold(low_res, crop_size)
        iou_preds, point_rows = iou_preds[keep], point_rows[keep.cpu()]
        boxes = masks_to_boxes(masks)
        image_box = [0, 0, image.shape[1], image.shape[0]]
        inside = ~boxes_near_crop_edge(boxes, crop_box, image_box)
        masks, boxes, iou_preds = masks[inside], boxes[inside], iou_preds[inside]
        stability, point_rows = stability[inside], point_rows[inside.cpu()]
        return MaskCandidates(
            rles=masks_to_rle(masks, image_size=(image.shape[0], image.shape[1]), offset=(x0, y0)),
            boxes=boxes.cpu(),
            iou_preds=iou_preds.cpu(),
            stability=stability.cpu(),
            points=point_rows,
            crop_boxes=torch.empty((len(point_rows), 4), dtype=torch.int64),
        )

    def _threshold(
        self, low_res: torch.Tensor, crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upscale (M, 4h, 4w) logits chunk by chunk; keep the stable ones.

        Returns (K, H, W) bool masks over the crop, their (K,) float32 stability scores and
        the (K,) indices of the kept rows.
        """
        threshold = self.mask_threshold
        masks, scores, kept = [], [], []
        for start in range(0, low_res.shape[0], UPSCALE_CHUNK):
            logits = self._upscale(low_res[start : start + UPSCALE_CHUNK], crop_size)
            score = stability_score(logits, threshold, self.stability_score_offset)
            keep = torch.arange(len(score), device=score.device)
            if self.stability_score_thresh > 0.0:
                keep = torch.nonzero(score >= self.stability_score_thresh).flatten()
                logits, score = logits[keep], score[keep]
            masks.append(logits > threshold)
            scores.append(score)
            kept.append(keep + start)
        if not masks:
            h, w = crop_size
            empty = low_res.new_zeros((0, h, w), dtype=torch.bool)
            return empty, low_res.new_zeros(0), torch.zeros(0, dtype=torch.int64)
        return torch.cat(masks), torch.cat(scores), torch.cat(kept)

    # -- post-processing --------------------------------------------------------------

    @staticmethod
    def postprocess_small_regions(
        candidates: MaskCandidates, min_area: int, nms_thresh: float
    ) -> MaskCandidates:
        """Fill small holes and drop small islands, then remove new duplicates by box NMS.

        Masks that needed no change win over changed ones in the NMS; changed masks get
        new RLEs and boxes.
        """
        if len(candidates) == 0:
            return candidates
        rles, boxes, unchanged = [], [], []
        for rle in candidates.rles:
            mask, filled = remove_small_regions(rle_to_mask(rle), min_area, "holes")
            mask, trimmed = remove_small_regions(mask, min_area, "islands")
            changed = filled or trimmed
            mask_t = torch.from_numpy(mask)[None]
            boxes.append(masks_to_boxes(mask_t)[0])
            # Only changed masks need a new RLE.
            rles.append(masks_to_rle(mask_t)[0] if changed else rle)
            unchanged.append(not changed)
        new_boxes = torch.stack(boxes)
        keep = batched_nms(
            new_boxes.float(),
            torch.tensor(unchanged, dtype=torch.float32),
            torch.zeros(len(new_boxes), dtype=torch.int64),
            nms_thresh,
        )
        candidates = MaskCandidates(
            rles=rles,
            boxes=new_boxes.to(candidates.boxes.dtype),
            iou_preds=candidates.iou_preds,
            stability=candidates.stability,
            points=candidates.points,
            crop_boxes=candidates.crop_boxes,
        )
        return candidates.select(keep)


class SamAutomaticMaskGenerator(GridMaskGenerator):
    """Generates masks for everything in an image with a grid of point prompts (SAM).

    Options (defaults suit SAM ViT-H, as the official generator's):
        model: the SAM model.
        points_per_side: points along each side of the grid (points_per_side² points);
            ``None`` when ``point_grids`` is given.
        points_per_batch: points run through the mask decoder together.
        pred_iou_thresh: keep masks whose predicted IoU is > this (0 disables).
        stability_score_thresh: keep masks whose stability score is >= this (0 disables).
        stability_score_offset: logit shift used for the stability score.
        box_nms_thresh: box IoU above which duplicates within a crop are removed.
        crop_n_layers: extra layers of crops; layer i has (2**i)² crops.
        crop_nms_thresh: box IoU above which duplicates across crops are removed (masks from
            smaller crops win).
        crop_overlap_ratio: overlap of first-layer crops as a fraction of the short side.
        crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points.
        point_grids: explicit (N, 2) grids of normalised (x, y) points, one per layer.
        min_mask_region_area: if > 0, fill holes and remove islands smaller than this many
            pixels, then drop new duplicates.
        output_mode: ``binary_mask`` ((H, W) bool), ``uncompressed_rle`` or ``coco_rle``
            (pycocotools compressed RLE with str counts).
        precision: ``auto`` (default), ``fp32``, ``bf16`` or ``fp16``
            (see :mod:`segany.inference.precision`); ``fp32`` gives the official generator's masks.
        compile: run the image encoder through ``torch.compile`` (see
            :mod:`segany.inference.compilation`).
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        options = checked_options(AmgOptions, locals())
        self._setup(SamPredictor(model, precision=precision, compile=compile), options)

    @property
    def model(self) -> Sam:
        return self.predictor.model

    @property
    def mask_threshold(self) -> float:
        """The model's logit threshold (the official generator has no option for it)."""
        return self.model.mask_threshold

    def _decode(
        self, points: torch.Tensor | np.ndarray, crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, 3, 4h, 4w) and predicted IoU (B, 3) for B single-point prompts.

        ``points`` (B, 2) float64 are pixels of the crop; the predictor's image must be that
        crop.
        """
        pixels = np.asarray(points, dtype=np.float64)  # a tensor, or an array (older callers)
        coords = torch.as_tensor(self.predictor.transform.apply_coords(pixels, crop_size))
        # The official generator passes float64 points, which the prompt encoder shifts to
        # pixel centres (+0.5) before rounding to float32. Rounding the shifted value here
        # and undoing the shift (exact in float32) gives the model the same numbers.
        coords = ((coords + 0.5).float() - 0.5).to(self.predictor.device)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        return self.predictor.decode_low_res(
            0, (coords, labels), multimask_output=True, min_iou=self._min_iou()
        )

    def _upscale(self, low_res: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
        """(M, 4h, 4w) low-res logits -> (M, H, W) logits over the crop (as the predictor)."""
        assert self.predictor.input_size is not None
        return upscale_logits(
            low_res[:, None], self.model.image_size, self.predictor.input_size, crop_size
        )[:, 0]

    def _reset_image(self) -> None:
        self.predictor.reset_image()

    def _postprocess(self, candidates: MaskCandidates) -> MaskCandidates:
        """With ``min_mask_region_area``, fill small holes and drop small islands (see
        :meth:`postprocess_small_regions`)."""
        if self.min_mask_region_area > 0 and len(candidates) > 0:
            candidates = self.postprocess_small_regions(
                candidates,
                self.min_mask_region_area,
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
        return candidates

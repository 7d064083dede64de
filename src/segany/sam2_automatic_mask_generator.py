"""Segment everything with SAM 2: masks for a grid of point prompts over an image and its
crops.

:class:`Sam2AutomaticMaskGenerator` is a drop-in for Meta's
``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator`` (``sam2`` 1.1.0): the same
options, defaults and records, and the same masks and scores for the same weights. It
runs on segany's :class:`~segany.sam2_predictor.Sam2ImagePredictor` and the machinery it
shares with SAM's generator (:class:`~segany.automatic_mask_generator.GridMaskGenerator`:
crops, grids, filters, NMS, RLE), so it gains their speed: masks are filtered by
predicted IoU before they are upscaled (the decoder skips upscaling the points whose
masks all fall under it), upscaled and thresholded in chunks, and run-length encoded
straight from the crop.

Where SAM 2's generator differs from SAM's, it follows Meta's:

* the crop is squashed to the model input, not padded: a point enters as fractions of
  the crop's width and height times the input size;
* a mask is its low-res logits resized once, bilinearly, to the crop, then thresholded
  at ``mask_threshold``; the stability score thresholds those logits at
  ``mask_threshold`` +- ``stability_score_offset``;
* ``multimask_output=False`` keeps one mask per point (SAM 2's single mask where it is
  stable, else its best of three); ``use_m2m`` decodes every mask again, its clamped
  low-res logits as a mask prompt with its point (one output), and filters the refined
  masks and scores instead;
* ``min_mask_region_area`` is not SAM's post-processing of the final masks: Meta's
  generator hands it to its image predictor as ``max_hole_area`` and
  ``max_sprinkle_area``, which fill holes and remove specks of at most that many pixels in
  the low-res logits (256 x 256 for the whole model input) before they are upscaled (see
  :func:`~segany.masks.remove_small_logit_regions`). Meta finds the regions with a CUDA
  kernel and skips the step, with a warning, where it cannot run it (on a CPU, or without
  the compiled extension); segany runs it everywhere, with OpenCV.

Conventions: coordinates are pixels of the original image, (x, y); boxes are XYXY
internally and XYWH in the records (inclusive corners, ``w = x_max - x_min``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .amg_options import Sam2AmgOptions
from .automatic_mask_generator import (
    GridMaskGenerator,
    SamAutomaticMaskGenerator,
    checked_options,
)
from .masks import remove_small_logit_regions
from .modeling.sam import Sam
from .modeling.sam2 import Sam2
from .sam2_predictor import LOW_RES_LIMIT, Sam2ImagePredictor

Points = tuple[torch.Tensor, torch.Tensor]


class Sam2AutomaticMaskGenerator(GridMaskGenerator):
    """Generates masks for everything in an image with a grid of point prompts (SAM 2).

    Options (defaults as Meta's, chosen for SAM 2 Hiera-L):
        model: the SAM 2 model.
        points_per_side: points along each side of the grid (points_per_side² points);
            ``None`` when ``point_grids`` is given.
        points_per_batch: points run through the mask decoder together.
        pred_iou_thresh: keep masks whose predicted IoU is > this (0 disables).
        stability_score_thresh: keep masks whose stability score is >= this (0 disables).
        stability_score_offset: logit shift used for the stability score.
        mask_threshold: logit above which a pixel is in a mask.
        box_nms_thresh: box IoU above which duplicates within a crop are removed.
        crop_n_layers: extra layers of crops; layer i has (2**i)² crops.
        crop_nms_thresh: box IoU above which duplicates across crops are removed (masks
            from smaller crops win).
        crop_overlap_ratio: overlap of first-layer crops as a fraction of the short side.
        crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points.
        point_grids: explicit (N, 2) grids of normalised (x, y) points, one per layer.
        min_mask_region_area: if > 0, fill holes and remove specks of at most this many
            low-res mask pixels before upscaling (see the module documentation).
        output_mode: ``binary_mask`` ((H, W) bool), ``uncompressed_rle`` or ``coco_rle``
            (pycocotools compressed RLE with str counts).
        use_m2m: refine every mask once with itself as a mask prompt.
        multimask_output: three masks per point; False: one.
        precision: ``auto`` (default), ``fp32``, ``bf16`` or ``fp16``
            (see :mod:`segany.inference.precision`); ``fp32`` gives Meta's masks.
        compile: run the image encoder through ``torch.compile``.

    Meta's constructor also swallows unknown keyword arguments; this one names them
    (TypeError).
    """

    # Meta's generator keeps the points as float32 (its records show those values).
    point_dtype = torch.float32
    predictor: Sam2ImagePredictor
    use_m2m: bool
    multimask_output: bool

    def __init__(
        self,
        model: Sam2,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        options = checked_options(Sam2AmgOptions, locals())
        self._setup(Sam2ImagePredictor(model, precision=precision, compile=compile), options)

    @classmethod
    def from_pretrained(
        cls, model_id: str, device: str | None = None, **kwargs: Any
    ) -> Sam2AutomaticMaskGenerator:
        """A generator on official SAM 2 weights (downloaded once, as
        :meth:`Sam2ImagePredictor.from_pretrained` does).

        ``model_id``: Meta's Hugging Face id (``facebook/sam2.1-hiera-large``) or any
        other name of the model (``sam2.1_l``, ...); ``device``: ``cpu``, ``cuda`` or None
        for the best one; ``kwargs``: the constructor's options (checked before anything
        is downloaded), ``precision`` and ``compile``.
        """
        precision = kwargs.pop("precision", "auto")
        compile = kwargs.pop("compile", False)
        options = Sam2AmgOptions(**kwargs)
        predictor = Sam2ImagePredictor.from_pretrained(
            model_id, device=device, precision=precision, compile=compile
        )
        generator = cls.__new__(cls)  # the predictor is made: set up around it
        generator._setup(predictor, options)
        return generator

    @property
    def model(self) -> Sam2:
        return self.predictor.model

    # -- the family's steps (see GridMaskGenerator) -------------------------------------

    def _decode(
        self, points: torch.Tensor, crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, C, 256, 256) and predicted IoU (B, C) for B single-point
        prompts, (B, 2) float32 (x, y) pixels of the crop set on the predictor; C = 3 with
        ``multimask_output``, else 1. With ``use_m2m``, each mask refined once."""
        coords = self.predictor._to_model_frame(points, crop_size, normalize=True)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        if not self.use_m2m:
            return self._decode_low_res((coords, labels), None, self.multimask_output)
        # Every first-pass mask is refined, so none may be left out of it.
        low_res, _ = self._decode_low_res(
            (coords, labels), None, self.multimask_output, may_skip=False
        )
        batch, count, height, width = low_res.shape
        # Each mask with its point, as Meta's predictor returns the logits to feed back.
        rows = (coords.repeat_interleave(count, 0), labels.repeat_interleave(count, 0))
        masks_in = low_res.clamp(-LOW_RES_LIMIT, LOW_RES_LIMIT).view(-1, 1, height, width)
        refined, iou = [], []
        # In batches of points_per_batch, as Meta's: each mask prompt has its own image
        # side in the decoder (4 MB a prompt at SAM 2's size).
        for start in range(0, len(masks_in), self.points_per_batch):
            part = slice(start, start + self.points_per_batch)
            logits, scores = self._decode_low_res(
                (rows[0][part], rows[1][part]), masks_in[part], multimask_output=False
            )
            refined.append(logits)
            iou.append(scores)
        return (
            torch.cat(refined).view(batch, count, height, width),
            torch.cat(iou).view(batch, count),
        )

    def _decode_low_res(
        self,
        points: Points,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        may_skip: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`Sam2ImagePredictor._predict` decodes, without its upscaling: the
        unclamped low-res logits (B, C, 256, 256) and predicted IoU (B, C), float32, of B
        point sets ((B, N, 2) in the model's S x S frame, (B, N) labels) with optional
        (B, 1, 256, 256) mask prompts, on the image set. ``may_skip``: leave out the
        masks under pred_iou_thresh (see :meth:`GridMaskGenerator._min_iou`)."""
        predictor = self.predictor
        return predictor.inference.decode(
            predictor._decoder_embedding[:1],
            points,
            None,
            mask_input,
            multimask_output,
            high_res_features=predictor._decoder_high_res_of(0),
            image=None if mask_input is not None else predictor._image_side(0),
            min_iou=self._min_iou() if may_skip else None,
        )

    def _upscale(self, low_res: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
        """(M, 256, 256) low-res logits -> (M, H, W) logits over the (H, W) crop: one
        bilinear resize (the crop was squashed, not padded), after the clean-up of
        ``min_mask_region_area``."""
        if self.min_mask_region_area > 0:
            # At the predictor's threshold, not the generator's: Meta's generator does not
            # pass its mask_threshold to the predictor that cleans the logits.
            low_res = remove_small_logit_regions(
                low_res, self.min_mask_region_area, self.predictor.mask_threshold
            )
        return F.interpolate(low_res[:, None], crop_size, mode="bilinear", align_corners=False)[
            :, 0
        ]

    def _reset_image(self) -> None:
        self.predictor.reset_predictor()


def automatic_mask_generator_for(
    model: Sam | Sam2, **options: Any
) -> SamAutomaticMaskGenerator | Sam2AutomaticMaskGenerator:
    """The automatic mask generator of ``model``'s family (SAM's or SAM 2's) with the
    keyword arguments ``options`` (that family's options, precision, compile)."""
    if isinstance(model, Sam2):
        return Sam2AutomaticMaskGenerator(model, **options)
    return SamAutomaticMaskGenerator(model, **options)

"""Evaluate a promptable segmenter as in the SAM paper (Kirillov et al. 2023, §7.1, App. D.1).

Every object of every image is prompted on its own; the image embedding is computed
once per image. All IoUs leave out ``ignore`` pixels (crowd regions).

Prompts:

* ``point``: one click at the object's "center", the pixel farthest from its boundary
  (image border counted as boundary), multimask output; IoU of the top-scoring mask
  and of the best of the three (oracle).
* ``clicks``: the click simulation of App. D.1. Click 1 as for ``point``; click k+1 is
  at the pixel farthest from the boundary of the largest (most pixels, 4-connected)
  error region of prediction k: a foreground click in a false-negative region, a
  background click in a false-positive one (a tie in area goes to the false negative).
  All clicks so far plus the previous low-res logits of the chosen mask (as
  ``mask_input``) are given at each step. As in the paper (App. A: one output for
  ambiguous single prompts gets three masks, more than one prompt a single mask),
  click 1 uses multimask output and clicks 2+ single-mask output. The top-scoring
  trajectory carries the highest-scoring mask of click 1 forward (as SAM's training
  simulation does); the oracle trajectory carries the best-IoU one, and differs from
  the top one only through that first choice. Reported: mIoU after 1, 2, 3, 5 and 9
  clicks for both, and NoC@85/NoC@90 on the top-scoring trajectory (clicks until
  IoU >= 0.85/0.90, ``max_clicks`` when never reached). A click lands on a pixel
  centre's integer coordinates (x = column, y = row); ties go to the first pixel in
  row-major order. When no error is left the IoU stays as it is for later clicks.
* ``box``: the tight box of the ground-truth mask (inclusive XYXY: x1/y1 are the last
  column/row of the object, the official SAM convention), single-mask output (a box is
  two corner prompts, so unambiguous by the paper's rule).

Baseline ``grabcut``: OpenCV GrabCut initialised with the same boxes (rectangle mode,
5 iterations), scored like the box prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .data import Sample, SegmentationDataset
from .errors import SeganyError
from .masks import masks_to_boxes
from .plots import new_figure, save_figure

__all__ = [
    "BASELINES",
    "CLICK_COUNTS",
    "PROMPTS",
    "Click",
    "ClickTrajectory",
    "EvalResult",
    "ObjectResult",
    "evaluate",
    "first_click",
    "grabcut",
    "iou",
    "mask_box",
    "next_click",
    "plot_click_curve",
    "simulate_clicks",
]

CLICK_COUNTS = (1, 2, 3, 5, 9)
NOC_THRESHOLDS = (0.85, 0.90)
PROMPTS = ("point", "box", "clicks")
BASELINES = ("grabcut",)
GRABCUT_ITERATIONS = 5
# GrabCut fits 5-component colour models inside and outside the box: it needs at least
# that many pixels on each side.
GRABCUT_MIN_PIXELS = 5


class Predictor(Protocol):
    """What evaluation needs of :class:`segany.predictor.SamPredictor`."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


# --------------------------------------------------------------------------- geometry


def iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of two (H, W) bool masks, ``ignore`` pixels left out.

    Two empty masks agree perfectly: 1.0.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if ignore is not None:
        valid = ~np.asarray(ignore, bool)
        pred, gt = pred & valid, gt & valid
    union = int(np.count_nonzero(pred | gt))
    return 1.0 if union == 0 else int(np.count_nonzero(pred & gt)) / union


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(4,) float inclusive XYXY box of an (H, W) bool mask (x1/y1: last column/row)."""
    return masks_to_boxes(torch.from_numpy(np.ascontiguousarray(mask, bool))).numpy().astype(float)


def _distance_to_boundary(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``region`` to the nearest pixel outside it.

    The image border counts as boundary: the mask is padded with one outside pixel.
    """
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def farthest_from_boundary(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``region`` farthest from its boundary (first in row-major order)."""
    distance = _distance_to_boundary(region)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


@dataclass(frozen=True)
class Click:
    """A simulated click at pixel (x, y); label 1 = foreground, 0 = background."""

    x: int
    y: int
    label: int


def first_click(gt: np.ndarray) -> Click:
    """The foreground click at the object's center (farthest from its boundary)."""
    if not gt.any():
        raise ValueError("cannot click on an empty mask")
    return Click(*farthest_from_boundary(gt), label=1)


def _largest_component(region: np.ndarray) -> tuple[np.ndarray | None, int]:
    """The largest 4-connected component of ``region`` and its area (None, 0 if empty)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        region.astype(np.uint8), connectivity=4
    )
    if count <= 1:
        return None, 0
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best, int(stats[best, cv2.CC_STAT_AREA])


def next_click(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> Click | None:
    """The correcting click for prediction ``pred`` of ``gt``; None when nothing is wrong.

    It is at the center of the largest error region: foreground for a missed part
    (false negative), background for an extra part (false positive). Ignore pixels
    are not errors.
    """
    valid = np.ones_like(gt, bool) if ignore is None else ~ignore
    missed, missed_area = _largest_component(gt & ~pred & valid)
    extra, extra_area = _largest_component(pred & ~gt & valid)
    if missed is not None and missed_area >= extra_area:
        return Click(*farthest_from_boundary(missed), label=1)
    if extra is not None:
        return Click(*farthest_from_boundary(extra), label=0)
    return None


# --------------------------------------------------------------------------- prompting


@dataclass
class ClickTrajectory:
    """One simulated interaction.

    Attributes:
        clicks: the clicks given, in order.
        ious: IoU after 1, 2, ... clicks (repeated once no error is left).
        first_ious: IoU of each candidate mask of click 1 (three with multimask).
        first_choice: index of the candidate of click 1 that was carried forward.
    """

    clicks: list[Click] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    first_ious: list[float] = field(default_factory=list)
    first_scores: list[float] = field(default_factory=list)  # their predicted IoUs
    first_choice: int = 0


def simulate_clicks(
    predictor: Predictor,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    max_clicks: int = 20,
    oracle: bool = False,
    stop_iou: float | None = None,
    min_clicks: int = 1,
) -> ClickTrajectory:
    """Simulate up to ``max_clicks`` clicks on ``gt`` with the image already set.

    Click 1 asks for three masks and keeps the top-scoring one (the best-IoU one with
    ``oracle``); later clicks ask for one mask, with the kept mask's low-res logits as
    ``mask_input``. Stops early once ``min_clicks`` clicks are done and some IoU
    reached ``stop_iou``.
    """
    result = ClickTrajectory()
    pred, mask_input = None, None
    while len(result.clicks) < max_clicks:
        click = first_click(gt) if pred is None else next_click(gt, pred, ignore)
        if click is None:  # nothing left to correct: further clicks change nothing
            result.ious += result.ious[-1:] * (min_clicks - len(result.ious))
            break
        result.clicks.append(click)
        masks, scores, logits = predictor.predict(
            point_coords=np.array([[c.x, c.y] for c in result.clicks], dtype=float),
            point_labels=np.array([c.label for c in result.clicks]),
            mask_input=mask_input,
            multimask_output=len(result.clicks) == 1,
        )
        masks = np.asarray(masks, bool)  # SAM 2's predictor gives 0/1 floats, as Meta's
        mask_ious = [iou(mask, gt, ignore) for mask in masks]
        pick = int(np.argmax(mask_ious if oracle else scores))
        if len(result.clicks) == 1:
            result.first_ious, result.first_choice = mask_ious, pick
            result.first_scores = [float(score) for score in scores]
        pred, mask_input = masks[pick], logits[pick][None]
        result.ious.append(mask_ious[pick])
        done = stop_iou is not None and max(result.ious) >= stop_iou
        if done and len(result.ious) >= min_clicks:
            break
    return result


def box_iou(predictor: Predictor, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of the single mask predicted for the tight box of ``gt``."""
    return box_prediction(predictor, gt, ignore)[0]


def box_prediction(
    predictor: Predictor, gt: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[float, float]:
    """(IoU, predicted IoU) of the single mask predicted for the tight box of ``gt``."""
    masks, scores, _ = predictor.predict(box=mask_box(gt), multimask_output=False)
    return iou(masks[0], gt, ignore), float(scores[0])


def grabcut(
    image: np.ndarray, box: np.ndarray | Sequence[float], iterations: int = GRABCUT_ITERATIONS
) -> np.ndarray:
    """(H, W) bool GrabCut segmentation of an (H, W, 3) uint8 image inside an inclusive XYXY box.

    When GrabCut cannot run (a box of fewer than 5 pixels, or leaving fewer than 5
    outside it) the filled box is the answer. Colour order does not matter to
    GrabCut's colour models, so RGB is used as is.
    """
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in np.rint(np.asarray(box, dtype=float)))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
    filled = np.zeros((height, width), bool)
    filled[y0 : y1 + 1, x0 : x1 + 1] = True
    inside = int(filled.sum())
    if inside < GRABCUT_MIN_PIXELS or height * width - inside < GRABCUT_MIN_PIXELS:
        return filled
    labels = np.zeros((height, width), np.uint8)
    rect = (x0, y0, x1 - x0 + 1, y1 - y0 + 1)
    models = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(
            np.ascontiguousarray(image), labels, rect, *models, iterations, cv2.GC_INIT_WITH_RECT
        )
    except cv2.error:  # e.g. a colour model it cannot fit; keep the box
        return filled
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


# --------------------------------------------------------------------------- results


@dataclass
class ObjectResult:
    """Scores of one object; None for prompts not evaluated.

    ``click_ious[k - 1]`` is the IoU after k clicks of the top-scoring trajectory,
    ``oracle_click_ious`` the same for the oracle one (up to 9 clicks); ``clicks``
    are the top trajectory's clicks as (x, y, label).
    """

    image_id: str
    object_name: str
    area: int
    box: list[float]
    clicks: list[tuple[int, int, int]] = field(default_factory=list)
    click_ious: list[float] = field(default_factory=list)
    oracle_click_ious: list[float] = field(default_factory=list)
    iou_point: float | None = None
    iou_point_oracle: float | None = None
    iou_box: float | None = None
    iou_grabcut: float | None = None
    # The model's predicted IoU of the masks scored in iou_point and iou_box.
    score_point: float | None = None
    score_box: float | None = None

    def noc(self, threshold: float, max_clicks: int) -> int:
        """Clicks needed to reach IoU >= ``threshold``; ``max_clicks`` if never reached."""
        reached = (k for k, value in enumerate(self.click_ious, 1) if value >= threshold)
        return min(next(reached, max_clicks), max_clicks)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known and len(known) == len(values) else None


def _correlation(records: Sequence[ObjectResult], predicted: str, actual: str) -> float | None:
    """Pearson correlation of two fields over the records; None if not evaluated or
    constant."""
    pairs = [(getattr(r, predicted), getattr(r, actual)) for r in records]
    if len(pairs) < 2 or any(p is None or a is None for p, a in pairs):
        return None
    x, y = np.asarray(pairs, dtype=float).T
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


@dataclass
class EvalResult:
    """Per-object results and their summary (:meth:`summary`)."""

    records: list[ObjectResult]
    prompts: tuple[str, ...]
    max_clicks: int
    baseline: str | None = None
    dataset: str = ""
    n_images: int = 0
    skipped_images: list[str] = field(default_factory=list)

    @property
    def curve_length(self) -> int:
        """Clicks for which every object has an IoU: up to 9 (the paper's largest)."""
        return min(max(CLICK_COUNTS), self.max_clicks) if "clicks" in self.prompts else 0

    def miou_after(self, clicks: int, oracle: bool = False) -> float | None:
        """mIoU after ``clicks`` clicks (None if not evaluated)."""
        if not 1 <= clicks <= self.curve_length:
            return None
        return _mean(
            [(r.oracle_click_ious if oracle else r.click_ious)[clicks - 1] for r in self.records]
        )

    def curve(self, oracle: bool = False) -> list[float | None]:
        """mIoU after 1, 2, ..., :attr:`curve_length` clicks."""
        return [self.miou_after(k, oracle) for k in range(1, self.curve_length + 1)]

    def _clicks_map(self, oracle: bool) -> dict[str, float | None] | None:
        if "clicks" not in self.prompts:
            return None
        return {str(k): self.miou_after(k, oracle) for k in CLICK_COUNTS}

    def _noc(self, threshold: float) -> float | None:
        if "clicks" not in self.prompts:
            return None
        return _mean([r.noc(threshold, self.max_clicks) for r in self.records])

    def summary(self) -> dict[str, Any]:
        """The headline numbers (JSON-ready); keys of prompts not evaluated are None."""
        records = self.records
        return {
            "dataset": self.dataset,
            "n_images": self.n_images,
            "n_objects": len(records),
            "skipped_images": len(self.skipped_images),
            "prompts": list(self.prompts),
            "max_clicks": self.max_clicks,
            "miou_point": _mean([r.iou_point for r in records]),
            "miou_point_oracle": _mean([r.iou_point_oracle for r in records]),
            "miou_box": _mean([r.iou_box for r in records]),
            "miou_clicks": self._clicks_map(oracle=False),
            "miou_clicks_oracle": self._clicks_map(oracle=True),
            "noc85": self._noc(NOC_THRESHOLDS[0]),
            "noc90": self._noc(NOC_THRESHOLDS[1]),
            "miou_curve": self.curve() or None,
            "miou_curve_oracle": self.curve(oracle=True) or None,
            "grabcut_miou_box": _mean([r.iou_grabcut for r in records]),
            # Calibration: how well the predicted IoU tracks the actual one (the automatic
            # mask generator filters on it).
            "score_correlation_point": _correlation(records, "score_point", "iou_point"),
            "score_correlation_box": _correlation(records, "score_box", "iou_box"),
        }

    def record_dicts(self) -> list[dict[str, Any]]:
        """The per-object records as JSON-ready dicts."""
        return [asdict(r) for r in self.records]


# --------------------------------------------------------------------------- running


def _check_prompts(prompt: str | Sequence[str]) -> tuple[str, ...]:
    prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    unknown = [p for p in prompts if p not in PROMPTS]
    if unknown or not prompts:
        raise SeganyError(f"unknown prompt {unknown[:1] or prompts}; use {', '.join(PROMPTS)}")
    return tuple(p for p in PROMPTS if p in prompts)  # fixed order, no repeats


def _score_clicks(
    record: ObjectResult,
    predictor: Predictor,
    gt: np.ndarray,
    ignore: np.ndarray | None,
    prompts: tuple[str, ...],
    max_clicks: int,
) -> None:
    if "clicks" not in prompts:
        top = simulate_clicks(predictor, gt, ignore, max_clicks=1)
    else:
        top = simulate_clicks(
            predictor,
            gt,
            ignore,
            max_clicks,
            stop_iou=max(NOC_THRESHOLDS),
            min_clicks=min(max(CLICK_COUNTS), max_clicks),
        )
        record.clicks = [(c.x, c.y, c.label) for c in top.clicks]
        record.click_ious = top.ious
        oracle_length = min(max(CLICK_COUNTS), max_clicks)
        if top.first_choice == int(np.argmax(top.first_ious)):
            # The same first mask: the oracle trajectory is the top one (deterministic).
            record.oracle_click_ious = top.ious[:oracle_length]
        else:
            oracle = simulate_clicks(
                predictor, gt, ignore, oracle_length, oracle=True, min_clicks=oracle_length
            )
            record.oracle_click_ious = oracle.ious
    record.iou_point = top.first_ious[top.first_choice]
    record.iou_point_oracle = max(top.first_ious)
    record.score_point = top.first_scores[top.first_choice]


def evaluate_object(
    predictor: Predictor | None,
    sample: Sample,
    index: int,
    prompts: tuple[str, ...],
    max_clicks: int = 20,
    baseline: str | None = None,
) -> ObjectResult:
    """Score object ``index`` of ``sample``; the predictor's image must be ``sample.image``."""
    gt, ignore = sample.masks[index], sample.ignore
    box = mask_box(gt)
    record = ObjectResult(
        sample.image_id, sample.object_names[index], int(gt.sum()), [float(v) for v in box]
    )
    if predictor is not None and ({"point", "clicks"} & set(prompts)):
        _score_clicks(record, predictor, gt, ignore, prompts, max_clicks)
    if predictor is not None and "box" in prompts:
        record.iou_box, record.score_box = box_prediction(predictor, gt, ignore)
    if baseline == "grabcut":
        record.iou_grabcut = iou(grabcut(sample.image, box), gt, ignore)
    return record


def evaluate(
    predictor: Predictor | None,
    dataset: SegmentationDataset | Sequence[Sample],
    prompt: str | Sequence[str] = "clicks",
    max_clicks: int = 20,
    progress: bool = True,
    baseline: str | None = None,
) -> EvalResult:
    """Evaluate ``predictor`` on every object of ``dataset``.

    Args:
        predictor: a :class:`~segany.predictor.SamPredictor` (or anything with its
            ``set_image``/``predict``); None to run only the ``baseline``.
        dataset: a :class:`~segany.data.SegmentationDataset` (unreadable samples are
            reported and skipped) or a sequence of samples.
        prompt: ``"point"``, ``"box"``, ``"clicks"`` or several of them.
        max_clicks: the click budget for ``clicks`` (NoC counts it when never reaching
            the IoU); mIoU is reported for 1, 2, 3, 5 and 9 clicks within it.
        progress: show a progress bar on stderr.
        baseline: ``"grabcut"`` to also score GrabCut with the same boxes.
    """
    prompts = _check_prompts(prompt) if predictor is not None else ()
    if max_clicks < 1:
        raise SeganyError(f"max_clicks must be at least 1, got {max_clicks}")
    if baseline not in (None, *BASELINES):
        raise SeganyError(f"unknown baseline {baseline!r}; use {', '.join(BASELINES)}")
    if predictor is None and baseline is None:
        raise SeganyError("nothing to evaluate: give a predictor or a baseline")
    get = getattr(dataset, "get", dataset.__getitem__)
    ids = getattr(dataset, "image_ids", None)
    result = EvalResult([], prompts, max_clicks, baseline, getattr(dataset, "name", ""))
    bar = tqdm(
        range(len(dataset)), desc="eval", unit="image", disable=not progress, file=sys.stderr
    )
    for index in bar:
        sample = get(index)
        if sample is None:
            result.skipped_images.append(ids[index] if ids else str(index))
            continue
        result.n_images += 1
        if len(sample.masks) == 0:
            continue
        if predictor is not None:
            predictor.set_image(sample.image)  # one embedding for all objects of the image
        for obj in range(len(sample.masks)):
            result.records.append(
                evaluate_object(predictor, sample, obj, prompts, max_clicks, baseline)
            )
        bar.set_postfix(objects=len(result.records), refresh=False)
    return result


# --------------------------------------------------------------------------- plot


def plot_click_curve(result: EvalResult, path: str | Path) -> Path:
    """Write a PNG of mIoU against the number of clicks (top-scoring and oracle)."""
    n = result.curve_length
    if n == 0 or not result.records:
        raise SeganyError("nothing to plot: evaluate with the 'clicks' prompt on some objects")
    figure, (axis,) = new_figure()
    clicks = list(range(1, n + 1))
    for label, values in (
        ("top-scoring mask", result.curve()),
        ("oracle (best of 3 at click 1)", result.curve(True)),
    ):
        shown = [(k, v) for k, v in zip(clicks, values) if v is not None]
        if shown:
            axis.plot(*zip(*shown), marker="o", label=label)
    axis.set(
        xlabel="clicks",
        ylabel="mIoU",
        ylim=(0, 1),
        xticks=clicks,
        title=f"mIoU vs clicks: {result.dataset or 'data'} ({len(result.records)} objects)",
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    return save_figure(figure, path)

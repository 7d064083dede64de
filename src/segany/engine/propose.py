"""The semi-automatic stage: automatic masks proposed where nothing is annotated yet.

Input: a COCO instances file and its images. The automatic stage (:mod:`.auto`, on Ray or
in this process) annotates every image into a work folder (resumable like any
``engine auto`` run); then each automatic mask becomes a *proposal* if it covers little
of the existing annotations: the pixels it shares with the union of the image's
annotations (crowd regions included), divided by its own area, must be at most
``max_overlap``. (Confidence is the generator's own filter: predicted IoU above
``pred_iou_thresh``, stability at least ``stability_score_thresh``.)

Output: a new COCO file with everything of the input unchanged (images, annotations,
categories and other keys, in order) plus the proposals, appended with new ids: COCO RLE
masks in a category ``segany_proposal``, each marked
``"segany": {"proposal": true, "predicted_iou", "stability_score", "point_coords",
"overlap"}`` and scored (``score``) by its predicted IoU. A person accepts a proposal by
setting ``"proposal"`` to false (and, if wanted, a real ``category_id``), or, in a tool
that drops unknown fields, by moving it to another category; ``segany engine retrain``
uses accepted annotations only (see :func:`is_proposal`).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..data.base import DataWarning
from ..data.coco import coco_image_dirs, load_coco_json, locate_image, segmentation_to_mask
from ..errors import SeganyError
from ..masks import CocoRLE, coco_bbox, pycoco_rle
from ..masks.formats import write_json
from .annotate import ModelSpec
from .auto import RunSettings, Summary, plan_auto, run_auto

PROPOSAL_CATEGORY = "segany_proposal"
DEFAULT_MAX_OVERLAP = 0.2


def is_proposal(annotation: dict[str, Any], proposal_categories: Collection[Any] = ()) -> bool:
    """Whether a COCO annotation is a proposal nobody has accepted yet.

    Its ``"segany": {"proposal": ...}`` mark decides (true: a proposal, false: accepted);
    without one, ``"source": "proposal"`` (as ``segany serve`` exports proposals) makes it a
    proposal, and so does a category in ``proposal_categories`` (the ids of
    ``segany_proposal``: a tool that drops unknown fields keeps the category).
    """
    marks = annotation.get("segany")
    if isinstance(marks, dict) and isinstance(marks.get("proposal"), bool):
        return marks["proposal"]
    if "source" in annotation:
        return annotation["source"] == "proposal"
    return annotation.get("category_id") in proposal_categories


def proposal_category_ids(data: dict[str, Any]) -> set[Any]:
    """The ids of the categories named ``segany_proposal`` in a COCO document."""
    return {
        c.get("id")
        for c in data.get("categories") or []
        if isinstance(c, dict) and c.get("name") == PROPOSAL_CATEGORY
    }


def overlap_fraction(proposal: CocoRLE, occupied: CocoRLE) -> float:
    """Pixels of ``proposal`` inside ``occupied`` over the pixels of ``proposal`` (both
    COCO RLE of the same image); 1 for an empty proposal, which is never wanted."""
    area = float(mask_utils.area(pycoco_rle(proposal)))
    if area == 0:
        return 1.0
    shared = mask_utils.merge([pycoco_rle(proposal), pycoco_rle(occupied)], intersect=True)
    return float(mask_utils.area(shared)) / area


def occupied_mask(annotations: list[dict[str, Any]], height: int, width: int) -> CocoRLE:
    """The union of ``annotations`` (polygons or RLE, crowd included) as COCO RLE;
    annotations that cannot be decoded are reported and left out."""
    union = np.zeros((height, width), dtype=bool)
    for ann in annotations:
        try:
            union |= segmentation_to_mask(ann.get("segmentation"), height, width)
        except ValueError as error:
            warnings.warn(
                f"annotation {ann.get('id')} left out of the overlap check: {error}",
                DataWarning,
                stacklevel=2,
            )
    encoded = mask_utils.encode(np.asfortranarray(union.astype(np.uint8)))
    return {"size": [height, width], "counts": encoded["counts"].decode()}


def select_proposals(
    automatic: list[dict[str, Any]], occupied: CocoRLE, max_overlap: float
) -> list[tuple[dict[str, Any], float]]:
    """The automatic annotations (SA-1B document entries) that overlap ``occupied`` by at
    most ``max_overlap`` of their own area, with that overlap, in their order."""
    chosen = []
    for ann in automatic:
        overlap = overlap_fraction(ann["segmentation"], occupied)
        if overlap <= max_overlap:
            chosen.append((ann, overlap))
    return chosen


@dataclass
class ProposeStats:
    """What a propose run found (printed by the CLI)."""

    images: int = 0
    images_missing: int = 0
    images_annotated: int = 0
    candidates: int = 0
    proposals: int = 0
    auto: Summary | None = None


def _proposal_category(data: dict[str, Any]) -> Any:
    """The id of the proposal category, added to ``data`` if it is not there yet."""
    known = proposal_category_ids(data)
    if known:
        return min(known, key=str)
    categories = data.setdefault("categories", [])
    ids = [c.get("id") for c in categories if isinstance(c, dict)]
    new_id = max((i for i in ids if isinstance(i, int)), default=0) + 1
    categories.append({"id": new_id, "name": PROPOSAL_CATEGORY, "supercategory": "segany"})
    return new_id


def _image_records(data: dict[str, Any], json_path: Path) -> list[dict[str, Any]]:
    records = [
        r
        for r in data["images"]
        if isinstance(r, dict) and isinstance(r.get("file_name"), str) and "id" in r
    ]
    if len(records) < len(data["images"]):
        warnings.warn(
            f"{len(data['images']) - len(records)} image record(s) of {json_path} without "
            "'id' or 'file_name' skipped",
            DataWarning,
            stacklevel=2,
        )
    return records


def locate_images(
    data: dict[str, Any], json_path: Path, images_dir: Path | None
) -> list[tuple[dict[str, Any], Path]]:
    """(image record, image file) for every image of the COCO file that is found, in
    ``images_dir`` or (without it) where segany.data looks: ``images/`` beside the JSON,
    beside it, and one folder up when it is in ``annotations/``."""
    dirs = [images_dir] if images_dir is not None else coco_image_dirs(json_path)
    records = _image_records(data, json_path)
    found = [(r, locate_image(r["file_name"], dirs)) for r in records]
    missing = [r["file_name"] for r, path in found if path is None]
    where = ", ".join(str(d) for d in dirs)
    if records and len(missing) == len(records):
        raise SeganyError(
            f"none of the {len(records)} images of {json_path} was found in {where}; "
            "give their folder with --images"
        )
    if missing:
        warnings.warn(
            f"{len(missing)} image(s) of {json_path} not found in {where} (skipped): "
            + ", ".join(missing[:3])
            + (", ..." if len(missing) > 3 else ""),
            DataWarning,
            stacklevel=2,
        )
    return [(r, path) for r, path in found if path is not None]


def propose(
    coco_path: Path,
    images_dir: Path | None,
    output: Path,
    work_dir: Path,
    spec: ModelSpec,
    settings: RunSettings,
    ray: ModuleType | None,
    max_overlap: float = DEFAULT_MAX_OVERLAP,
) -> ProposeStats:
    """Write ``output``: the COCO file ``coco_path`` plus proposals (see the module
    docstring). Automatic masks are kept in ``work_dir`` (one SA-1B JSON per image), so a
    rerun, or a run with another ``max_overlap``, costs no model work."""
    if not 0 <= max_overlap <= 1:
        raise SeganyError(f"--max-overlap must be between 0 and 1, got {max_overlap:g}")
    data = load_coco_json(coco_path)
    located = locate_images(data, coco_path, images_dir)
    stats = ProposeStats(images=len(data["images"]))
    stats.images_missing = len(data["images"]) - len(located)
    jobs = plan_auto([path for _, path in located], work_dir)
    if not jobs:
        raise SeganyError(f"{coco_path} lists no images; nothing to propose")
    stats.auto = run_auto(jobs, work_dir, spec, settings, ray)

    result = copy.deepcopy(data)  # the input stays as it was, and is written first
    category = _proposal_category(result)
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    numbers = [a.get("id") for a in data["annotations"] if isinstance(a, dict)]
    next_id = max((i for i in numbers if isinstance(i, int)), default=0) + 1
    for (record, _), job in zip(located, jobs, strict=True):
        if not job.done():
            continue  # failed: listed in the work folder's failures.jsonl
        document = json.loads(job.main_output.read_text())
        height, width = document["image"]["height"], document["image"]["width"]
        if (record.get("height", height), record.get("width", width)) != (height, width):
            warnings.warn(
                f"image {record['file_name']} is {width}x{height} but {coco_path} says "
                f"{record.get('width')}x{record.get('height')}; no proposals for it",
                DataWarning,
                stacklevel=2,
            )
            continue
        stats.images_annotated += 1
        stats.candidates += len(document["annotations"])
        occupied = occupied_mask(by_image.get(record["id"], []), height, width)
        for ann, overlap in select_proposals(document["annotations"], occupied, max_overlap):
            result["annotations"].append(
                {
                    "id": next_id,
                    "image_id": record["id"],
                    "category_id": category,
                    "segmentation": ann["segmentation"],
                    "area": ann["area"],
                    "bbox": coco_bbox(ann["segmentation"]),
                    "iscrowd": 0,
                    "score": ann["predicted_iou"],
                    "segany": {
                        "proposal": True,
                        "predicted_iou": ann["predicted_iou"],
                        "stability_score": ann["stability_score"],
                        "point_coords": ann["point_coords"],
                        "overlap": round(overlap, 6),
                    },
                }
            )
            next_id += 1
            stats.proposals += 1
    write_json(output, result)
    return stats

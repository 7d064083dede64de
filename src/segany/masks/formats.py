"""Files for automatic-mask-generator output: SA-1B JSON, COCO instances, the official
``amg.py`` PNG folder, and a colour picture of all masks. Every file is written atomically.

The input everywhere is the list of records from
:meth:`segany.SamAutomaticMaskGenerator.generate`, whatever its ``output_mode``.

Box conventions: a record's ``bbox`` is the generator's XYWH with inclusive corners
(``w = x_max - x_min``, as the official generator and SA-1B); the COCO file instead uses
pycocotools' ``toBbox`` (``w`` = width in pixels, ``x_max - x_min + 1``), which is what COCO
tools expect.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segany.atomic import write_text_atomic
from segany.images import mask_colors, overlay_masks, write_image, write_mask_png
from segany.masks import CocoRLE, coco_bbox, coco_to_mask, rle_to_coco, rle_to_mask

PathLike = str | os.PathLike[str]

AMG_CSV_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)
COCO_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}

# Masks tinted per overlay pass: bounds the (N, H, W) stack the drawing code builds.
OVERLAY_CHUNK = 64

_MASK_PNG = re.compile(r"^(\d+)\.png$")


# -------------------------------------------------------------------------------------
# Segmentations in any output mode
# -------------------------------------------------------------------------------------


def record_coco_rle(record: dict[str, Any]) -> CocoRLE:
    """A record's mask as compressed COCO RLE with str ``counts``.

    Accepts each generator ``output_mode``: an (H, W) bool array, an uncompressed RLE
    (list counts) or a compressed RLE (str or bytes counts).
    """
    segmentation = record["segmentation"]
    if isinstance(segmentation, np.ndarray):
        encoded = mask_utils.encode(np.asfortranarray(segmentation.astype(np.uint8)))
        return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return rle_to_coco(segmentation)
    text = counts.decode() if isinstance(counts, bytes) else counts
    return {"size": [int(s) for s in segmentation["size"]], "counts": text}


def record_mask(record: dict[str, Any]) -> np.ndarray:
    """A record's mask as an (H, W) bool array, whatever the ``output_mode``."""
    segmentation = record["segmentation"]
    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool, copy=False)
    if isinstance(segmentation["counts"], list):
        return rle_to_mask(segmentation)
    return coco_to_mask(segmentation)


# -------------------------------------------------------------------------------------
# SA-1B and COCO documents
# -------------------------------------------------------------------------------------


def sa1b_document(
    records: Sequence[dict[str, Any]],
    image_id: int,
    file_name: str,
    height: int,
    width: int,
) -> dict[str, Any]:
    """SA-1B-style per-image document.

    ``{"image": {image_id, file_name, width, height}, "annotations": [{id, segmentation
    (COCO RLE, str counts), bbox, area, predicted_iou, stability_score, crop_box,
    point_coords}]}``; annotation ids count from 1 in record order.
    """
    annotations = [
        {
            "id": i,
            "segmentation": record_coco_rle(record),
            "bbox": [float(v) for v in record["bbox"]],
            "area": int(record["area"]),
            "predicted_iou": float(record["predicted_iou"]),
            "stability_score": float(record["stability_score"]),
            "crop_box": [float(v) for v in record["crop_box"]],
            "point_coords": [[float(x), float(y)] for x, y in record["point_coords"]],
        }
        for i, record in enumerate(records, start=1)
    ]
    image = {"image_id": int(image_id), "file_name": file_name, "width": width, "height": height}
    return {"image": image, "annotations": annotations}


def coco_document(
    documents: Sequence[dict[str, Any]], categories: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """COCO instances for several images, from their SA-1B documents (in that order).

    Images keep their ``image_id``; annotations are numbered from 1 across all images,
    have ``iscrowd`` 0, an RLE ``segmentation``, pycocotools' ``area`` and ``bbox``, and
    ``score`` (the predicted IoU, when the annotation has one); every other field of the
    input annotation (the SAM fields, ...) is copied. The category is the annotation's
    ``category_id``, by default 1 (``object``); ``categories`` lists them (default: just
    ``object``).
    """
    images, annotations = [], []
    for document in documents:
        info = document["image"]
        images.append(
            {
                "id": info["image_id"],
                "file_name": info["file_name"],
                "width": info["width"],
                "height": info["height"],
            }
        )
        for ann in document["annotations"]:
            coco = {
                "id": len(annotations) + 1,
                "image_id": info["image_id"],
                "category_id": ann.get("category_id", COCO_CATEGORY["id"]),
                "segmentation": ann["segmentation"],
                "area": ann["area"],
                "bbox": coco_bbox(ann["segmentation"]),
                "iscrowd": 0,
            }
            if "predicted_iou" in ann:
                coco["score"] = ann["predicted_iou"]
            coco.update((key, value) for key, value in ann.items() if key not in coco)
            annotations.append(coco)
    listed = [dict(c) for c in categories] if categories is not None else [dict(COCO_CATEGORY)]
    return {"images": images, "annotations": annotations, "categories": listed}


def write_json(path: PathLike, document: dict[str, Any]) -> Path:
    """Write ``document`` as compact JSON, atomically."""
    return write_text_atomic(path, json.dumps(document, separators=(",", ":")))


# -------------------------------------------------------------------------------------
# The official amg.py layout: one PNG per mask plus metadata.csv
# -------------------------------------------------------------------------------------


def amg_metadata_csv(records: Sequence[dict[str, Any]]) -> str:
    """``metadata.csv`` text as the official ``scripts/amg.py`` writes it.

    Header, then one row per mask: id, area, bbox (4), point (2), predicted_iou,
    stability_score, crop_box (4); values printed with ``str``; no final newline.
    """
    rows = [AMG_CSV_HEADER]
    for i, record in enumerate(records):
        values = [
            i,
            record["area"],
            *record["bbox"],
            *record["point_coords"][0],
            record["predicted_iou"],
            record["stability_score"],
            *record["crop_box"],
        ]
        rows.append(",".join(str(v) for v in values))
    return "\n".join(rows)


def write_amg_folder(folder: PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``0.png, 1.png, ...`` (255 inside) and ``metadata.csv`` into ``folder``.

    ``metadata.csv`` is written last, so its presence marks a complete folder; it is
    removed first, and mask PNGs left from an earlier, longer run are deleted.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    (target / "metadata.csv").unlink(missing_ok=True)
    for stale in target.iterdir():
        match = _MASK_PNG.match(stale.name)
        if match and int(match.group(1)) >= len(records):
            stale.unlink()
    for i, record in enumerate(records):
        write_mask_png(target / f"{i}.png", record_mask(record))
    write_text_atomic(target / "metadata.csv", amg_metadata_csv(records))
    return target


# -------------------------------------------------------------------------------------
# Picture
# -------------------------------------------------------------------------------------


def draw_masks(
    image: np.ndarray, records: Sequence[dict[str, Any]], alpha: float = 0.5
) -> np.ndarray:
    """All masks tinted over ``image`` ((H, W, 3) uint8 RGB), largest first so small masks
    stay visible on top; each mask gets its own colour and an outline."""
    order = sorted(range(len(records)), key=lambda i: -int(records[i]["area"]))
    colours = mask_colors(len(order))
    canvas = image
    for start in range(0, len(order), OVERLAY_CHUNK):
        chunk = order[start : start + OVERLAY_CHUNK]
        canvas = overlay_masks(
            canvas,
            [record_mask(records[i]) for i in chunk],
            alpha=alpha,
            colors=colours[start : start + len(chunk)],
        )
    return canvas.copy() if canvas is image else canvas


def write_overlay(
    path: PathLike, image: np.ndarray, records: Sequence[dict[str, Any]], alpha: float = 0.5
) -> Path:
    """Write :func:`draw_masks` to ``path`` (format from the suffix), atomically."""
    return write_image(path, draw_masks(image, records, alpha))

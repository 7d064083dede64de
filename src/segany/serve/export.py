"""Exports of a project: COCO instances JSON (RLE masks) and a folder (or zip) of PNG masks.

Both list the kept objects (``manual`` and ``auto``; proposals only when asked) of the
images that have any, images by id and objects by id. A label becomes a COCO category
(unlabelled objects are ``object``); categories are numbered from 1 in name order.

The COCO export is what ``segany engine retrain`` reads: kept objects are ordinary
annotations (``source`` ``manual`` or ``auto``, a kept proposal included), which it trains
on; a proposal still waiting (with ``include_proposals``) has ``source`` ``proposal`` and
the mark ``segany engine propose`` writes, ``"segany": {"proposal": true,
"predicted_iou", ...}`` (with the stability score and the rest of the mark it was imported
with), which it leaves out.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..atomic import write_text_atomic
from ..images import write_mask_png
from ..masks import coco_to_mask
from ..masks.formats import COCO_CATEGORY, coco_document
from .store import ProjectStore, StoredImage, StoredObject

KEPT_SOURCES = ("manual", "auto")
CSV_COLUMNS = (
    "object_id",
    "image_id",
    "file_name",
    "mask_file",
    "label",
    "source",
    "score",
    "area",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
)


def file_name(image: StoredImage) -> str:
    """The image's name in exports: relative to IMAGES_DIR, or ``uploads/NAME``."""
    return image.name if image.source == "folder" else f"uploads/{image.name}"


def _category(obj: StoredObject) -> str:
    return obj.label or COCO_CATEGORY["name"]


def exported_objects(
    store: ProjectStore, include_proposals: bool = False
) -> list[tuple[StoredImage, list[StoredObject]]]:
    """(image, its objects) for every image with objects to export, by image id."""
    sources = (*KEPT_SOURCES, "proposal") if include_proposals else KEPT_SOURCES
    grouped: dict[int, list[StoredObject]] = {}
    for obj in store.objects(sources=sources):
        grouped.setdefault(obj.image_id, []).append(obj)
    return [(store.image(image_id), objects) for image_id, objects in sorted(grouped.items())]


def coco_export(store: ProjectStore, include_proposals: bool = False) -> dict[str, Any]:
    """The project as a COCO instances document (see the module docstring).

    Each annotation also carries ``segany_object_id``, ``source`` and ``prompts`` (points
    in pixels of the image, label 1 = foreground, box XYXY).
    """
    groups = exported_objects(store, include_proposals)
    marks = store.import_marks() if include_proposals else {}
    names = sorted({_category(obj) for _, objects in groups for obj in objects})
    category_ids = {name: index for index, name in enumerate(names, start=1)}
    documents = [
        {
            "image": {
                "image_id": image.id,
                "file_name": file_name(image),
                "width": objects[0].mask["size"][1],
                "height": objects[0].mask["size"][0],
            },
            "annotations": [
                _annotation(obj, category_ids[_category(obj)], marks.get(obj.id, {}))
                for obj in objects
            ],
        }
        for image, objects in groups
    ]
    categories = [
        {"id": i, "name": name, "supercategory": "object"} for name, i in category_ids.items()
    ]
    return coco_document(documents, categories)


def _annotation(obj: StoredObject, category_id: int, marks: dict[str, Any]) -> dict[str, Any]:
    """The COCO annotation of an object; ``marks``: those it was imported with."""
    annotation: dict[str, Any] = {
        "segmentation": obj.mask,
        "area": obj.area,
        "category_id": category_id,
        "segany_object_id": obj.id,
        "source": obj.source,
        "prompts": obj.prompts,
    }
    if obj.score is not None:
        annotation["predicted_iou"] = obj.score
    if obj.source == "proposal":
        annotation["segany"] = proposal_mark(obj, marks)
    return annotation


def proposal_mark(obj: StoredObject, marks: dict[str, Any]) -> dict[str, Any]:
    """The ``"segany"`` field of a waiting proposal, in ``segany engine propose``'s format:
    ``proposal`` true, the predicted IoU and the imported marks (stability score, ...)."""
    mark: dict[str, Any] = {"proposal": True}
    if obj.score is not None:
        mark["predicted_iou"] = obj.score
    points = obj.prompts.get("points")
    if points and "point_coords" not in marks:
        mark["point_coords"] = points  # a proposal of "Segment everything": its grid point
    mark.update((key, value) for key, value in marks.items() if key not in mark)
    return mark


def mask_file(image: StoredImage, obj: StoredObject) -> str:
    """Where an object's PNG goes in a mask export: ``<image id>_<image stem>/<object id>.png``."""
    return f"{image.id}_{PurePosixPath(image.name).stem}/{obj.id}.png"


def write_png_folder(store: ProjectStore, folder: Path, include_proposals: bool = False) -> Path:
    """One 0/255 PNG per object (see :func:`mask_file`) and ``objects.csv`` listing them
    (written last, so its presence marks a complete export)."""
    rows = []
    for image, objects in exported_objects(store, include_proposals):
        for obj in objects:
            relative = mask_file(image, obj)
            write_mask_png(folder / relative, coco_to_mask(obj.mask))
            rows.append(_csv_row(image, obj, relative))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    write_text_atomic(folder / "objects.csv", text.getvalue())
    return folder


def _csv_row(image: StoredImage, obj: StoredObject, relative: str) -> Sequence[Any]:
    score = "" if obj.score is None else f"{obj.score:.6g}"
    return (
        obj.id,
        image.id,
        file_name(image),
        relative,
        obj.label,
        obj.source,
        score,
        obj.area,
        *obj.bbox,
    )


def png_zip(store: ProjectStore, target_dir: Path, include_proposals: bool = False) -> Path:
    """:func:`write_png_folder` packed as ``target_dir/masks.zip``; returns its path."""
    with tempfile.TemporaryDirectory(prefix="segany-masks-") as work:
        folder = write_png_folder(store, Path(work), include_proposals)
        return Path(shutil.make_archive(str(target_dir / "masks"), "zip", folder))

"""Import a COCO instances file into a project: the last step of the data engine's loop.

``segany engine propose`` writes a COCO file holding the original annotations plus
automatic masks marked as proposals; imported here, the proposals are shown with keep and
delete buttons, and an export of the project is what ``segany engine retrain`` learns from.

* Images are matched by ``file_name``, relative to the served folder (uploads as
  ``uploads/NAME``, as exports name them). The name may carry leading folders the served
  names lack (``images/x.jpg`` is ``x.jpg``) or the other way round, as long as one name
  ends with the other and only one image fits. Annotations of images that are not found,
  whose file cannot be read or whose size differs from the file's are skipped and
  reported, and so are crowd regions (the tool has no crowd objects) and empty masks.
* An annotation that :func:`segany.engine.propose.is_proposal` calls a proposal (the rule
  ``retrain`` uses) comes in with source ``proposal``, the rest as accepted objects (source
  ``manual``, or ``auto`` when the file says so). Labels are category names; the category
  ``segany_proposal`` only marks proposals, so it gives no label. The predicted IoU becomes
  the object's score; the whole ``"segany"`` mark (stability score, point, overlap) is kept
  for exports.
* Polygons and RLE (compressed or not) are decoded with pycocotools after segany's own
  checks of the run lengths.
* The file is read and every mask decoded before anything is written, and all objects are
  added in one transaction: a bad file changes nothing. Importing a file again adds nothing
  (see :meth:`.store.ProjectStore.import_objects`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..data.coco import load_coco_json, segmentation_problem, segmentation_to_mask
from ..engine.propose import PROPOSAL_CATEGORY, is_proposal, proposal_category_ids
from ..errors import SeganyError
from ..masks import check_rle, coco_bbox, coco_to_rle
from ..masks.formats import record_coco_rle
from .export import file_name
from .library import ImageLibrary
from .store import ImportedObject, NewObject, ProjectStore, StoredImage

LABEL_LENGTH = 200  # the API's limit on labels
NAMES_SHOWN = 3


@dataclass
class Skipped:
    """Annotations left out for one reason, and the images they belong to."""

    annotations: int = 0
    images: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    """What an import did: objects and proposals added, and what it left out why."""

    file: Path
    objects: int = 0
    proposals: int = 0
    images: int = 0
    already_imported: int = 0
    skipped: dict[str, Skipped] = field(default_factory=dict)

    def skip(self, reason: str, image: str, annotations: int = 1) -> None:
        """Count ``annotations`` of ``image`` as left out for ``reason``."""
        entry = self.skipped.setdefault(reason, Skipped())
        entry.annotations += annotations
        if image not in entry.images:
            entry.images.append(image)

    def lines(self) -> list[str]:
        """The report for people: a summary line, then a line per reason to skip."""
        lines = [
            f"imported {self.file}: {_count(self.objects, 'object')} and "
            f"{_count(self.proposals, 'proposal')} on {_count(self.images, 'image')}"
            + (f"; {self.already_imported} already imported" if self.already_imported else "")
        ]
        for reason, entry in self.skipped.items():
            names = ", ".join(entry.images[:NAMES_SHOWN])
            more = ", ..." if len(entry.images) > NAMES_SHOWN else ""
            lines.append(
                f"  skipped {_count(entry.annotations, 'annotation')} ({reason}) of "
                f"{_count(len(entry.images), 'image')}: {names}{more}"
            )
        return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


class ImageFinder:
    """Finds the project image a COCO ``file_name`` means (see the module docstring)."""

    def __init__(self, images: list[StoredImage]) -> None:
        self.by_name: dict[str, StoredImage] = {}
        self.by_ending: dict[str, list[StoredImage]] = defaultdict(list)
        for image in images:
            name = file_name(image)
            self.by_name.setdefault(name, image)  # a folder image wins over an upload
            parts = PurePosixPath(name).parts
            for start in range(1, len(parts)):
                self.by_ending["/".join(parts[start:])].append(image)

    def find(self, name: str) -> list[StoredImage]:
        """The images ``name`` may mean: one, none, or several when it is ambiguous."""
        parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", ".")]
        # The longest tail of the name that is a project image's name...
        for start in range(len(parts)):
            image = self.by_name.get("/".join(parts[start:]))
            if image is not None:
                return [image]
        # ... else project images whose names end with the whole name.
        return self.by_ending.get("/".join(parts), [])


def _problem(message: str, coco_path: Path) -> SeganyError:
    return SeganyError(f"cannot import {coco_path}: {message}")


def _is_key(value: Any) -> bool:
    """Whether a JSON value can be an id to look up (lists and objects cannot)."""
    return not isinstance(value, list | dict)


def _image_records(data: dict[str, Any], coco_path: Path) -> dict[Any, dict[str, Any]]:
    """Image records by id; SeganyError for one without ``id`` or ``file_name``."""
    records = {}
    for index, record in enumerate(data["images"]):
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise _problem(f"image record {index} has no 'file_name'", coco_path)
        if not isinstance(record.get("id"), int | str):
            raise _problem(f"image {record['file_name']!r} has no 'id'", coco_path)
        records[record["id"]] = record
    return records


def _checked_annotations(data: dict[str, Any], coco_path: Path) -> list[dict[str, Any]]:
    """The annotations, each checked to have an ``image_id`` and a segmentation that looks
    decodable; SeganyError naming the first that does not."""
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise _problem(f"annotation {index} is not an object", coco_path)
        if not isinstance(ann.get("image_id"), int | str):
            problem = "no 'image_id'"
        elif not _is_key(ann.get("category_id")):
            problem = "'category_id' must be a number or a string"
        else:
            problem = segmentation_problem(ann.get("segmentation"))
        if problem:
            raise _problem(f"annotation {ann.get('id', index)}: {problem}", coco_path)
    return data["annotations"]


def _labels(data: dict[str, Any], coco_path: Path) -> dict[Any, str]:
    """Category id -> label (the proposal category gives none)."""
    categories = data.get("categories") or []
    if not isinstance(categories, list):
        raise _problem("'categories' must be a list", coco_path)
    labels = {}
    for index, category in enumerate(categories):
        if isinstance(category, dict) and not _is_key(category.get("id")):
            raise _problem(f"category {index}: 'id' must be a number or a string", coco_path)
        if isinstance(category, dict) and isinstance(category.get("name"), str):
            name = category["name"].strip()
            labels[category.get("id")] = "" if name == PROPOSAL_CATEGORY else name
    return labels


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of COCO polygons or RLE; ValueError naming the problem.

    pycocotools trusts RLE run lengths (too many overrun its buffer), so they are checked
    first with segany's own decoder.
    """
    if isinstance(segmentation, dict):
        counts = segmentation.get("counts")
        coco_to_rle(segmentation) if isinstance(counts, str) else check_rle(segmentation)
    return segmentation_to_mask(segmentation, height, width)


def _number(*values: Any) -> float | None:
    """The first finite real number among ``values``, if any."""
    for value in values:
        if isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value):
            return float(value)
    return None


def _finite_json(value: Any) -> bool:
    """Whether a JSON value holds no NaN or Infinity."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_json(item) for item in value.values())
    if isinstance(value, list):
        return all(_finite_json(item) for item in value)
    return True


def _point_prompts(points: Any) -> dict[str, Any]:
    """The prompts of a proposal from its ``point_coords`` (foreground clicks), if valid."""
    if not isinstance(points, list) or not points:
        return {}
    if not all(
        isinstance(p, list) and len(p) == 2 and all(_number(v) is not None for v in p)
        for p in points
    ):
        return {}
    return {"points": points, "labels": [1] * len(points), "box": None}


def _new_object(
    ann: dict[str, Any], mask: np.ndarray, label: str, proposal: bool
) -> tuple[NewObject, dict[str, Any]]:
    """The object to store for a decoded annotation, and its ``"segany"`` marks."""
    marks = ann.get("segany") if isinstance(ann.get("segany"), dict) else {}
    # A NaN or Infinity (Python's json reads them) could never be exported again: dropped.
    marks = {
        key: value for key, value in marks.items() if key != "proposal" and _finite_json(value)
    }
    coco = record_coco_rle({"segmentation": mask})
    # Kept automatic masks (as serve exports them) stay automatic.
    accepted = "auto" if ann.get("source") == "auto" else "manual"
    new = NewObject(
        mask=coco,
        area=int(mask.sum()),
        bbox=coco_bbox(coco),
        label=label[:LABEL_LENGTH],
        source="proposal" if proposal else accepted,
        score=_number(marks.get("predicted_iou"), ann.get("predicted_iou"), ann.get("score")),
        prompts=_point_prompts(marks.get("point_coords")),
    )
    return new, marks


class _ImageMatcher:
    """The project image for each image of the file, or a reason to skip it."""

    def __init__(
        self, records: dict[Any, dict[str, Any]], library: ImageLibrary, report: ImportReport
    ) -> None:
        library.scan()
        self.records, self.library, self.report = records, library, report
        self.finder = ImageFinder(library.store.images())

    def image(self, image_id: Any, annotations: int) -> StoredImage | None:
        """The project image (size known) for the file's ``image_id``, or None after
        reporting why its ``annotations`` are skipped."""
        record = self.records.get(image_id)
        if record is None:
            self.report.skip("no image record with their image_id", str(image_id), annotations)
            return None
        name = record["file_name"]
        found = self.finder.find(name)
        if len(found) != 1:
            reason = "name fits several images" if found else "image not in the folder"
            self.report.skip(reason, name, annotations)
            return None
        try:
            image = self.library.with_size(found[0])
        except SeganyError:  # NotFound (the file went away) or unreadable
            self.report.skip("image file unreadable", name, annotations)
            return None
        stated = (record.get("width", image.width), record.get("height", image.height))
        if stated != (image.width, image.height):
            # Another picture of that name, or a resized copy: its masks would not fit.
            self.report.skip("image size differs from the file's", name, annotations)
            return None
        return image


def import_coco(store: ProjectStore, coco_path: Path, images_root: Path | None) -> ImportReport:
    """Add the annotations of the COCO instances file ``coco_path`` to the project of
    ``store`` whose images are served from ``images_root`` (None: uploads only).

    See the module docstring; SeganyError (nothing changed) for a missing or unreadable
    file, one that is not COCO instances JSON, or an annotation that cannot be decoded.
    """
    coco_path = Path(coco_path)
    data = load_coco_json(coco_path)
    records = _image_records(data, coco_path)
    annotations = _checked_annotations(data, coco_path)
    labels = _labels(data, coco_path)
    proposal_categories = proposal_category_ids(data)

    report = ImportReport(coco_path)
    # The store's folder is the project folder (uploads live there).
    matcher = _ImageMatcher(records, ImageLibrary(store, images_root, store.path.parent), report)
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in annotations:
        by_image[ann["image_id"]].append(ann)
    items: list[ImportedObject] = []
    for image_id, anns in by_image.items():
        image = matcher.image(image_id, len(anns))
        if image is None:
            continue
        name = records[image_id]["file_name"]
        for ann in anns:
            if ann.get("iscrowd"):
                report.skip("crowd regions", name)
                continue
            try:
                mask = decode_segmentation(ann["segmentation"], image.height, image.width)
            except ValueError as error:
                raise _problem(f"annotation {ann.get('id')}: {error}", coco_path) from None
            if not mask.any():
                report.skip("empty masks", name)
                continue
            label = labels.get(ann.get("category_id"), "")
            new, marks = _new_object(ann, mask, label, is_proposal(ann, proposal_categories))
            items.append(ImportedObject(image.id, new, json.dumps(ann.get("id")), marks))

    added = store.import_objects(items, str(coco_path.resolve()))
    report.proposals = sum(item.object.source == "proposal" for item in added)
    report.objects = len(added) - report.proposals
    report.images = len({item.image_id for item in added})
    report.already_imported = len(items) - len(added)
    return report

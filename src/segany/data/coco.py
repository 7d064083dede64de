"""COCO instances JSON: polygons (one or several parts), uncompressed and compressed RLE.

Layouts found: ``<root>/annotations.json`` or any single ``<root>/*.json`` /
``<root>/annotations/*.json`` (or the JSON file itself given as the root). Image
``file_name`` entries are looked up in ``images/`` and beside the JSON (and one
folder up when the JSON is in ``annotations/``). ``iscrowd`` objects become
ignore regions. Masks are decoded with pycocotools.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from functools import partial
from numbers import Real
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import SeganyError
from ..masks import check_rle, coco_to_rle, rle_to_mask
from .base import IMAGE_SUFFIXES, DecodedObjects, ImageEntry, report, summarise_skipped

__all__ = [
    "coco_json_candidates",
    "decode_rle",
    "index_coco",
    "is_safe_file_name",
    "segmentation_problem",
    "segmentation_to_mask",
]

# (object name, segmentation, is crowd)
CocoObject = tuple[str, Any, bool]


def _has_image_beside(path: Path) -> bool:
    return any(path.with_suffix(s).is_file() for s in IMAGE_SUFFIXES)


def coco_json_candidates(root: Path) -> list[Path]:
    """JSON files that may be COCO annotations (SA-1B's per-image JSONs excluded)."""
    if root.is_file():
        return [root] if root.suffix.lower() == ".json" else []
    beside = sorted(root.glob("*.json"))
    beside = [p for p in beside if p.name != "splits.json" and not _has_image_beside(p)]
    return beside + sorted((root / "annotations").glob("*.json"))


def _find_json(root: Path) -> Path:
    candidates = coco_json_candidates(root)
    preferred = [p for p in candidates if p.name == "annotations.json"]
    if preferred:
        return preferred[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SeganyError(f"no COCO annotation JSON found in {root}; give the JSON file as --data")
    names = ", ".join(p.name for p in candidates[:4])
    raise SeganyError(f"several JSON files in {root} ({names}); give the one to use as --data")


def load_coco_json(path: Path) -> dict[str, Any]:
    """A COCO instances JSON as a dict; SeganyError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SeganyError(f"cannot read COCO annotations {path}: {error}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise SeganyError(
            f"{path} is not a COCO instances file: it needs 'images' and 'annotations' lists"
        )
    return data


def _is_number_list(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, Real) and not isinstance(v, bool) for v in values
    )


def segmentation_problem(segmentation: Any) -> str | None:
    """Why a COCO ``segmentation`` cannot be decoded, or None when it looks valid."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty segmentation"
        for polygon in segmentation:
            if not _is_number_list(polygon) or len(polygon) < 6 or len(polygon) % 2:
                return "a polygon must be a list of at least 3 x, y pairs"
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not _is_number_list(size) or len(size) != 2:
            return "RLE needs 'size': [height, width]"
        if not isinstance(counts, str) and not _is_number_list(counts):
            return "RLE 'counts' must be a string or a list of run lengths"
        return None
    return f"segmentation must be polygons or RLE, got {type(segmentation).__name__}"


def decode_rle(rle: dict[str, Any] | list[dict[str, Any]]) -> np.ndarray:
    """pycocotools RLE(s) -> (H, W) bool mask (their union for a list)."""
    if isinstance(rle, list):
        rle = mask_utils.merge(rle)
    with warnings.catch_warnings():
        # pycocotools' decode trips a NumPy 2 "copy keyword" DeprecationWarning; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def _check_polygons(polygons: list[list[float]], height: int, width: int) -> None:
    """ValueError unless every coordinate is finite and within one image size of the image.

    pycocotools rasterises polygons in C without checks: NaN, infinity or coordinates of
    about 1e9 crash the process (or allocate gigabytes), so annotation files from
    elsewhere are checked first. Polygons reaching a little outside the image are kept.
    """
    side = max(height, width)
    for polygon in polygons:
        values = np.asarray(polygon, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < -side or values.max() > 2 * side:
            raise ValueError(
                f"polygon coordinates must be finite pixel positions near the {width}x{height} "
                "image"
            )


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode COCO polygons or RLE to an (H, W) bool mask; ValueError if it does not fit.

    Polygons are in pixels of the image (x, y pairs); several polygons are one object.
    RLEs are decoded by segany after checking that their runs cover exactly the image
    (pycocotools trusts the counts and writes past its buffer when they add up to more).
    """
    problem = segmentation_problem(segmentation)
    if problem:
        raise ValueError(problem)
    if isinstance(segmentation, list):
        _check_polygons(segmentation, height, width)
        rle = mask_utils.frPyObjects(segmentation, height, width)
        try:
            return decode_rle(rle)
        except Exception as error:  # pycocotools raises bare Exceptions
            raise ValueError(f"cannot decode polygons: {error}") from None
    rle_height, rle_width = (int(v) for v in segmentation["size"])
    if (rle_height, rle_width) != (height, width):
        raise ValueError(
            f"RLE size {rle_width}x{rle_height} differs from the {width}x{height} image"
        )
    counts = segmentation["counts"]
    checked = {"size": [height, width], "counts": counts}
    # Both raise ValueError naming the problem (malformed string, runs not adding up).
    return rle_to_mask(coco_to_rle(checked) if isinstance(counts, str) else check_rle(checked))


def _decode_coco(
    objects: tuple[CocoObject, ...], where: str, height: int, width: int
) -> DecodedObjects:
    decoded = DecodedObjects()
    for name, segmentation, crowd in objects:

        def decode(seg: Any = segmentation) -> np.ndarray:
            return segmentation_to_mask(seg, height, width)

        if crowd:
            decoded.add_ignore(decode, where)
        else:
            decoded.add(name, decode, where)
    return decoded


def coco_image_dirs(json_path: Path) -> list[Path]:
    """Folders where the images of a COCO JSON may be: images/ beside it, or its own folder."""
    folder = json_path.parent
    dirs = [folder / "images", folder]
    if folder.name == "annotations":
        dirs += [folder.parent / "images", folder.parent]
    return dirs


def is_safe_file_name(file_name: str) -> bool:
    """Whether an annotation's ``file_name`` stays inside the folder it is looked up in:
    relative (no ``/``, ``\\`` or drive at the start), no ``..`` part, no NUL.

    Annotation files come from elsewhere; one naming ``/etc/passwd`` or ``../../x`` must
    not make segany read outside the data folder (as the web app refuses such names).
    """
    posix = PurePosixPath(file_name.replace("\\", "/"))
    return (
        bool(file_name)
        and "\0" not in file_name
        and not posix.is_absolute()
        and ".." not in posix.parts
        and not PureWindowsPath(file_name).drive
    )


def locate_image(file_name: str, dirs: list[Path]) -> Path | None:
    """The first ``dir / file_name`` that exists, or None (always None for a name that
    :func:`is_safe_file_name` refuses)."""
    if not is_safe_file_name(file_name):
        return None
    # os.path.isfile answers False for names the file system refuses (too long, ...).
    return next((d / file_name for d in dirs if os.path.isfile(d / file_name)), None)


def _annotation_problem(ann: Any) -> str | None:
    if not isinstance(ann, dict):
        return "not an object"
    if not isinstance(ann.get("image_id"), int | str):
        return "no 'image_id'"
    return segmentation_problem(ann.get("segmentation"))


def _objects_by_image(data: dict[str, Any], json_path: Path) -> dict[Any, list[CocoObject]]:
    categories = {
        c.get("id"): str(c.get("name", c.get("id")))
        for c in data.get("categories") or []
        if isinstance(c, dict)
    }
    objects: dict[Any, list[CocoObject]] = defaultdict(list)
    malformed: list[str] = []
    for index, ann in enumerate(data["annotations"]):
        problem = _annotation_problem(ann)
        ann_id = ann.get("id", index) if isinstance(ann, dict) else index
        if problem:
            malformed.append(f"annotation {ann_id} ({problem})")
            continue
        category = categories.get(ann.get("category_id"), str(ann.get("category_id", "object")))
        objects[ann.get("image_id")].append(
            (f"{category}_{ann_id}", ann["segmentation"], bool(ann.get("iscrowd", 0)))
        )
    summarise_skipped("malformed annotations", malformed, json_path)
    return objects


def index_coco(root: Path) -> list[ImageEntry]:
    """Index a COCO instances data set (see the module docstring for the layout)."""
    json_path = _find_json(root)
    data = load_coco_json(json_path)
    objects = _objects_by_image(data, json_path)
    dirs = coco_image_dirs(json_path)
    entries, missing, empty, unsafe = [], [], [], []
    for record in data["images"]:
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            report(f"skipped an image record without 'file_name' in {json_path}")
            continue
        file_name = record["file_name"]
        if not is_safe_file_name(file_name):
            unsafe.append(repr(file_name))
            continue
        found = objects.get(record.get("id"), [])
        if not any(not crowd for _, _, crowd in found):
            empty.append(file_name)
            continue
        path = locate_image(file_name, dirs)
        if path is None:
            missing.append(file_name)
            continue
        where = f"{path.name} ({json_path.name})"
        n_objects = sum(not crowd for _, _, crowd in found)
        decode = partial(_decode_coco, tuple(found), where)
        entries.append(ImageEntry(Path(file_name).stem, path, n_objects, decode))
    summarise_skipped(
        "images whose file_name leaves the data folder (absolute or '..')", unsafe, json_path
    )
    summarise_skipped("images without objects", empty, json_path)
    summarise_skipped("missing image files", missing, json_path)
    return entries

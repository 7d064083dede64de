"""YOLO-seg text labels: ``labels/<sub>/<stem>.txt`` for ``images/<sub>/<stem>.<ext>``.

One object per line, ``class x1 y1 x2 y2 ...``, coordinates normalised to [0, 1]
by the image width and height. Class names come from ``data.yaml``/``*.yaml``
(``names:`` list or mapping) or ``classes.txt`` in the root when present, else
the class number is the name. Polygons are rasterised with pycocotools.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import yaml
from pycocotools import mask as mask_utils

from .base import DecodedObjects, ImageEntry, image_files, report, summarise_skipped
from .coco import decode_rle

__all__ = ["index_yolo", "parse_label_line"]

# Normalised coordinates a little outside [0, 1] are rounding; far outside is pixels.
TOLERANCE = 0.01

# (class number, flat normalised x, y coordinates)
YoloObject = tuple[int, tuple[float, ...]]


def _names_from_yaml(path: Path) -> dict[int, str] | None:
    try:
        names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return None
    if isinstance(names, list):
        return dict(enumerate(str(n) for n in names))
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items() if str(k).isdigit()}
    return None


def class_names(root: Path) -> dict[int, str]:
    """Class number -> name from the data set's YAML or classes.txt (empty when none)."""
    yamls = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    yamls.sort(key=lambda p: p.stem != "data")  # data.yaml first
    for path in yamls:
        names = _names_from_yaml(path)
        if names:
            return names
    for path in (root / "classes.txt", root / "labels" / "classes.txt"):
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            return {i: line.strip() for i, line in enumerate(lines) if line.strip()}
    return {}


def parse_label_line(line: str) -> YoloObject:
    """``class x1 y1 x2 y2 ...`` -> (class, coords); ValueError naming the problem."""
    fields = line.split()
    try:
        class_id = float(fields[0])
        coords = tuple(float(v) for v in fields[1:])
    except ValueError:
        raise ValueError("expected numbers") from None
    if not class_id.is_integer() or class_id < 0:
        raise ValueError(f"class {fields[0]!r} is not a non-negative integer")
    if len(coords) == 4:
        raise ValueError("a detection box (class cx cy w h), not a polygon")
    if len(coords) < 6 or len(coords) % 2:
        raise ValueError("expected class x1 y1 x2 y2 ... with at least 3 points")
    if not all(-TOLERANCE <= v <= 1 + TOLERANCE for v in coords):
        raise ValueError("coordinates must be normalised to [0, 1]")
    return int(class_id), coords


def _read_labels(path: Path, root: Path) -> list[YoloObject]:
    """The valid lines of a label file; malformed lines are reported in one line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        report(f"skipped unreadable label file {path.relative_to(root)}: {error}")
        return []
    objects, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            objects.append(parse_label_line(line))
        except ValueError as error:
            bad.append(f"line {number}: {error}")
    if bad:
        report(f"skipped {len(bad)} malformed line(s) in {path.relative_to(root)} ({bad[0]})")
    return objects


def _polygon_mask(coords: tuple[float, ...], height: int, width: int) -> np.ndarray:
    scaled = np.asarray(coords, dtype=np.float64).reshape(-1, 2) * (width, height)
    return decode_rle(mask_utils.frPyObjects([scaled.ravel().tolist()], height, width))


def _decode_yolo(
    objects: tuple[tuple[str, tuple[float, ...]], ...], where: str, height: int, width: int
) -> DecodedObjects:
    decoded = DecodedObjects()
    for name, coords in objects:
        decoded.add(name, partial(_polygon_mask, coords, height, width), where)
    return decoded


def _orphan_labels(images: Path, labels: Path) -> list[str]:
    """Label files that no image under ``images/`` matches."""
    stems = {p.relative_to(images).with_suffix("") for p in image_files(images, recursive=True)}
    return [
        str(p.relative_to(labels))
        for p in sorted(labels.rglob("*.txt"))
        if p.name != "classes.txt" and p.relative_to(labels).with_suffix("") not in stems
    ]


def index_yolo(root: Path) -> list[ImageEntry]:
    """Index a YOLO-seg data set: every image under ``images/`` with a non-empty label."""
    names = class_names(root)
    images, labels = root / "images", root / "labels"
    entries, unlabelled = [], []
    for path in image_files(images, recursive=True):
        label = labels / path.relative_to(images).with_suffix(".txt")
        objects = _read_labels(label, root) if label.is_file() else []
        if not objects:
            unlabelled.append(str(path.relative_to(images)))
            continue
        named = tuple(
            (f"{names.get(cls, str(cls))}_{i}", coords) for i, (cls, coords) in enumerate(objects)
        )
        where = str(label.relative_to(root))
        entries.append(ImageEntry(path.stem, path, len(named), partial(_decode_yolo, named, where)))
    summarise_skipped("images without objects", unlabelled, images)
    summarise_skipped("label files without an image", _orphan_labels(images, labels), labels)
    return entries

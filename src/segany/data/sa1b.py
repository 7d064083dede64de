"""SA-1B: ``<stem>.json`` beside ``<stem>.jpg``, objects in ``annotations[].segmentation``.

Each JSON holds ``{"image": {...}, "annotations": [{"id", "segmentation": COCO RLE,
...}]}``. The JSONs are large, so they are only paired with their images when
indexing and parsed when the sample is loaded.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from .base import (
    IMAGE_SUFFIXES,
    AnnotationError,
    DecodedObjects,
    ImageEntry,
    image_files,
    summarise_skipped,
)
from .coco import segmentation_to_mask

__all__ = ["index_sa1b", "sa1b_pairs"]


def sa1b_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, json) pairs with the same stem directly in ``root``."""
    pairs = []
    for json_path in sorted(root.glob("*.json")):
        images = (json_path.with_suffix(suffix) for suffix in IMAGE_SUFFIXES)
        image = next((p for p in images if p.is_file()), None)
        if image is not None:
            pairs.append((image, json_path))
    return pairs


def _decode_sa1b(json_path: Path, height: int, width: int) -> DecodedObjects:
    try:
        with open(json_path, encoding="utf-8") as handle:
            annotations = json.load(handle)["annotations"]
        if not isinstance(annotations, list):
            raise TypeError("'annotations' is not a list")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise AnnotationError(f"cannot read annotations {json_path.name}: {error}") from None
    decoded = DecodedObjects()
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            decoded.problems.append(f"skipped annotation {index} of {json_path.name}: not a dict")
            continue
        segmentation = ann.get("segmentation")
        decoded.add(
            str(ann.get("id", index)),
            partial(segmentation_to_mask, segmentation, height, width),
            json_path.name,
        )
    return decoded


def index_sa1b(root: Path) -> list[ImageEntry]:
    """Index an SA-1B folder; images without a JSON are reported and left out."""
    pairs = sa1b_pairs(root)
    paired = {image for image, _ in pairs}
    lonely = [p.name for p in image_files(root) if p not in paired]
    summarise_skipped("images without a JSON", lonely, root)
    return [
        ImageEntry(image.stem, image, None, partial(_decode_sa1b, json_path))
        for image, json_path in pairs
    ]

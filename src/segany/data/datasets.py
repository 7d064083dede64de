"""Segmentation data sets in four formats, read lazily as :class:`Sample` objects.

>>> dataset = load_dataset("../shared/data/coco-mval", split="val")
>>> sample = dataset.get(0)  # None (and one warning) if the image is unreadable

Formats (``format=None`` detects them from the folder layout, in this order):

* ``masks``: ``images/<stem>.<ext>`` + ``masks/<stem>__<object>.png`` (+ ``ignore/``);
* ``yolo``: ``images/**/<stem>.<ext>`` + ``labels/**/<stem>.txt`` (YOLO-seg polygons);
* ``coco``: a COCO instances JSON (``annotations.json``, ``*.json``,
  ``annotations/*.json`` or the JSON file itself);
* ``sa1b``: ``<stem>.jpg`` + ``<stem>.json`` pairs (SA-1B).

Bad data never stops a run: malformed annotations, images without objects and
missing files are reported once (a :class:`DataWarning` naming the file) and left
out when indexing; an image that fails to decode is reported by :meth:`get`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import SeganyError
from ..images import read_image
from .base import AnnotationError, DataWarning, ImageEntry, report
from .coco import coco_json_candidates, index_coco
from .pngmasks import index_masks
from .sa1b import index_sa1b, sa1b_pairs
from .yolo import index_yolo

__all__ = [
    "FORMATS",
    "DataWarning",
    "Sample",
    "SegmentationDataset",
    "detect_format",
    "load_dataset",
]

INDEXERS: dict[str, Callable[[Path], list[ImageEntry]]] = {
    "coco": index_coco,
    "yolo": index_yolo,
    "sa1b": index_sa1b,
    "masks": index_masks,
}
FORMATS = tuple(INDEXERS)


@dataclass
class Sample:
    """One image and its objects.

    Attributes:
        image_id: the image file's stem.
        path: the image file.
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool, one mask per object (N may be 0).
        ignore: (H, W) bool pixels left out of scoring (crowd regions), or None.
        object_names: N names, one per mask.
    """

    image_id: str
    path: Path
    image: np.ndarray
    masks: np.ndarray
    ignore: np.ndarray | None
    object_names: list[str]


class SegmentationDataset(Dataset):
    """Indexed images whose files are read when a sample is requested.

    Masks that are empty or cover more than ``max_mask_fraction`` of the image are
    dropped (as in the SAM paper's evaluation), so a sample may have no masks.
    """

    def __init__(
        self,
        entries: Sequence[ImageEntry],
        name: str = "",
        format: str = "",
        max_mask_fraction: float = 0.9,
    ) -> None:
        self.entries = list(entries)
        self.name = name
        self.format = format
        self.max_mask_fraction = max_mask_fraction
        self._reported: set[str] = set()

    @property
    def image_ids(self) -> list[str]:
        return [entry.image_id for entry in self.entries]

    @property
    def num_objects(self) -> int | None:
        """Annotated objects (before decoding and size filtering); None if unknown (SA-1B)."""
        counts = [entry.n_objects for entry in self.entries]
        return None if None in counts else sum(c for c in counts if c is not None)

    def __len__(self) -> int:
        return len(self.entries)

    def select(self, indices: Sequence[int]) -> SegmentationDataset:
        """A data set of the entries at ``indices`` (e.g. ``range(10)`` for the first ten)."""
        return SegmentationDataset(
            [self.entries[i] for i in indices], self.name, self.format, self.max_mask_fraction
        )

    def __getitem__(self, index: int) -> Sample:
        """The sample at ``index``; SeganyError naming the file if it cannot be read."""
        entry = self.entries[index]
        image = read_image(entry.path)
        try:
            decoded = entry.decode(*image.shape[:2])
        except AnnotationError as error:
            raise SeganyError(f"{error} (image {entry.path})") from None
        for problem in decoded.problems:
            self._report_once(problem)
        keep = self._keep(decoded.masks, image.shape[:2])
        masks = [decoded.masks[i] for i in keep]
        return Sample(
            image_id=entry.image_id,
            path=entry.path,
            image=image,
            masks=np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), bool),
            ignore=np.logical_or.reduce(decoded.ignore) if decoded.ignore else None,
            object_names=[decoded.names[i] for i in keep],
        )

    def get(self, index: int) -> Sample | None:
        """Like ``dataset[index]`` but an unreadable sample is reported once and gives None."""
        try:
            return self[index]
        except SeganyError as error:
            self._report_once(f"skipped: {error}")
            return None

    def _keep(self, masks: list[np.ndarray], size: tuple[int, int]) -> list[int]:
        """Indices of masks that are neither empty nor larger than the allowed fraction."""
        limit = self.max_mask_fraction * size[0] * size[1]
        return [i for i, mask in enumerate(masks) if 0 < int(mask.sum()) <= limit]

    def _report_once(self, message: str) -> None:
        # A data set read for several epochs should not repeat its warnings.
        if message not in self._reported:
            self._reported.add(message)
            report(message)

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name!r}, format={self.format!r}, images={len(self)})"


# --------------------------------------------------------------------------- loading


def detect_format(root: str | os.PathLike[str]) -> str:
    """The format of a data folder from its layout; SeganyError when it is unclear."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".json":
            return "coco"
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        return "masks"
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        return "yolo"
    elif coco_json_candidates(root):
        return "coco"
    elif sa1b_pairs(root):
        return "sa1b"
    raise SeganyError(
        f"cannot tell the format of {root}: expected images/ + masks/ (masks), "
        "images/ + labels/ (yolo), a COCO .json (coco) or <stem>.jpg + <stem>.json pairs "
        "(sa1b); give the format with --format"
    )


def _find_splits(root: Path, splits_file: str | os.PathLike[str] | None) -> Path:
    if splits_file is not None:
        if not Path(splits_file).is_file():
            raise SeganyError(f"splits file {splits_file} not found")
        return Path(splits_file)
    folder = data_folder(root)
    for candidate in (folder.parent / "splits.json", folder / "splits.json"):
        if candidate.is_file():
            return candidate
    raise SeganyError(
        f"no splits.json beside or inside {folder}; give one or use all images (split 'all')"
    )


def _read_splits(path: Path) -> dict[str, dict[str, list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SeganyError(f"cannot read splits file {path}: {error}") from None
    if not isinstance(data, dict):
        raise SeganyError(f"{path} must map split names to {{dataset: [stems]}}")
    # Other top-level keys (e.g. a "note") are not splits.
    return {
        name: {k: [str(s) for s in v] for k, v in split.items() if isinstance(v, list)}
        for name, split in data.items()
        if isinstance(split, dict)
    }


def data_folder(root: Path) -> Path:
    """The data set's folder: ``root``, or the folder of a COCO JSON given as root."""
    if root.is_dir():
        return root.resolve()
    folder = root.resolve().parent
    return folder.parent if folder.name == "annotations" else folder


def dataset_name(root: Path) -> str:
    """The key of a data set in splits.json: its folder's name."""
    return data_folder(root).name


def split_stems(
    root: Path, split: str, splits_file: str | os.PathLike[str] | None = None
) -> tuple[set[str], bool]:
    """(stems, keep): the images of ``split`` are those in ``stems`` if keep, else the rest.

    ``train`` means every image not listed in another split, unless the file lists it.
    """
    path = _find_splits(root, splits_file)
    splits = _read_splits(path)
    name = dataset_name(root)
    if name in splits.get(split, {}):
        return set(splits[split][name]), True
    if split == "train" and any(name in listed for listed in splits.values()):
        return {s for listed in splits.values() for s in listed.get(name, [])}, False
    known = sorted(splits)
    raise SeganyError(
        f"{path} has no {split!r} split for data set {name!r} (splits: {', '.join(known)}); "
        "use split 'all'"
    )


def _apply_split(
    entries: list[ImageEntry],
    root: Path,
    split: str,
    splits_file: str | os.PathLike[str] | None,
) -> list[ImageEntry]:
    stems, keep = split_stems(root, split, splits_file)
    chosen = [e for e in entries if (e.image_id in stems) == keep]
    if keep:
        unknown = sorted(stems - {e.image_id for e in entries})
        if unknown:
            report(
                f"{len(unknown)} image(s) of split {split!r} not found in {root} "
                f"(or without objects): {', '.join(unknown[:3])}"
            )
    return chosen


def load_dataset(
    root: str | os.PathLike[str],
    format: str | None = None,
    split: str | None = None,
    splits_file: str | os.PathLike[str] | None = None,
    max_mask_fraction: float = 0.9,
) -> SegmentationDataset:
    """Index the data set in ``root`` (a folder, or a COCO JSON file).

    Args:
        root: the data folder.
        format: ``coco``, ``yolo``, ``sa1b`` or ``masks``; detected when None.
        split: None or ``"all"`` for every image; ``"val"`` (or any split named in
            splits.json) for the listed stems; ``"train"`` for all other images.
        splits_file: splits.json; by default ``<root>/../splits.json`` or
            ``<root>/splits.json``, keyed by the data folder's name.
        max_mask_fraction: masks covering more of the image are dropped.

    Images are sorted by ``image_id``. Raises SeganyError for a missing folder, an
    unknown format or split, or when no annotated image is left.
    """
    path = Path(root)
    if not path.exists():
        raise SeganyError(f"data folder {path} not found; give the folder with your data set")
    if not 0 < max_mask_fraction <= 1:
        raise SeganyError(f"max_mask_fraction must be in (0, 1], got {max_mask_fraction}")
    chosen = format or detect_format(path)
    if chosen not in INDEXERS:
        raise SeganyError(f"unknown data format {chosen!r}; choose one of {', '.join(FORMATS)}")
    if path.is_file() and chosen != "coco":
        raise SeganyError(f"{path} is a file; the {chosen} format needs the data folder")
    entries = sorted(INDEXERS[chosen](path), key=lambda e: (e.image_id, str(e.path)))
    if not entries:
        raise SeganyError(f"no annotated images found in {path} (format {chosen})")
    if split not in (None, "all"):
        entries = _apply_split(entries, path, split, splits_file)
        if not entries:
            raise SeganyError(f"no annotated images of split {split!r} in {path}")
    return SegmentationDataset(entries, dataset_name(path), chosen, max_mask_fraction)

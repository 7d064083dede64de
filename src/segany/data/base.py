"""Pieces shared by the data-set readers: index entries, decoded objects, reporting.

Each reader turns a folder into a list of :class:`ImageEntry`: an image file plus a
``decode(height, width)`` function that rasterises its objects when the sample is
loaded. Indexing reads only small text/JSON files; images and masks are read lazily.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..images import open_image

__all__ = [
    "IMAGE_SUFFIXES",
    "AnnotationError",
    "DataWarning",
    "DecodedObjects",
    "ImageEntry",
    "image_files",
    "read_mask_png",
    "report",
    "summarise_skipped",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


class DataWarning(UserWarning):
    """A problem in a data set (bad file or annotation) that was skipped."""


class AnnotationError(Exception):
    """A whole annotation file cannot be used (found when its sample is loaded)."""


def report(message: str) -> None:
    """Report one skipped problem as a one-line :class:`DataWarning`."""
    warnings.warn(" ".join(message.split()), DataWarning, stacklevel=3)


def summarise_skipped(what: str, names: Sequence[str], where: Path | str) -> None:
    """Report ``len(names)`` skipped items in one line, naming the first few."""
    if not names:
        return
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    report(f"skipped {len(names)} {what} in {where}: {shown}")


@dataclass
class DecodedObjects:
    """Objects of one image, rasterised at its size.

    ``masks`` and ``ignore`` hold (H, W) bool arrays; ``problems`` one line per
    object that could not be decoded (and was left out).
    """

    names: list[str] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    ignore: list[np.ndarray] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, name: str, decode: Callable[[], np.ndarray], where: str) -> None:
        """Decode one object mask; a failure becomes a problem line naming ``where``."""
        try:
            self.masks.append(decode())
        except (ValueError, TypeError, KeyError, OSError) as error:
            self.problems.append(f"skipped object {name!r} of {where}: {error}")
        else:
            self.names.append(name)

    def add_ignore(self, decode: Callable[[], np.ndarray], where: str) -> None:
        try:
            self.ignore.append(decode())
        except (ValueError, TypeError, KeyError, OSError) as error:
            self.problems.append(f"skipped ignore region of {where}: {error}")


# (height, width) of the loaded image -> its objects; raises AnnotationError.
Decoder = Callable[[int, int], DecodedObjects]


@dataclass(frozen=True)
class ImageEntry:
    """One indexed image: ``image_id`` is the file stem (the key used by splits.json).

    ``n_objects`` is the number of annotated objects (before decoding and size
    filtering), or None when the format only tells on loading (SA-1B).
    """

    image_id: str
    path: Path
    n_objects: int | None
    decode: Decoder


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted; hidden files skipped)."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def read_mask_png(path: Path, height: int, width: int) -> np.ndarray:
    """A mask image as (H, W) bool; raises ValueError naming the problem.

    Values above 127 are the object (0/255 masks), except that a mask whose largest
    value is 1 is read as 0/1 and a palette mask as "any index but 0". Colour masks
    use their brightest channel.
    """
    try:
        with open_image(path) as opened:  # the pixel limit is checked before decoding
            palette = opened.mode == "P"
            values = np.asarray(opened)
    except Exception as error:  # Pillow raises many types for bad files
        raise ValueError(f"cannot read mask {path.name}: {error}") from None
    if values.ndim == 3:
        values = values[..., :3].max(axis=2)
    if values.shape != (height, width):
        raise ValueError(
            f"mask {path.name} is {values.shape[1]}x{values.shape[0]}, "
            f"the image is {width}x{height}"
        )
    binary = palette or values.max(initial=0) <= 1
    return values > (0 if binary else 127)

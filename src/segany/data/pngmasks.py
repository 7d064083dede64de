"""Folders of PNG masks: ``images/<stem>.<ext>`` and ``masks/<stem>__<object>.png``.

Each mask file is one object (0 background, 255 object). Optional
``ignore/<stem>__<name>.png`` files mark pixels left out of scoring; all of an
image's ignore files are united.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .base import DecodedObjects, ImageEntry, image_files, read_mask_png, summarise_skipped

__all__ = ["group_by_stem", "index_masks"]

SEPARATOR = "__"


def _owner(name: str, stems: set[str]) -> str | None:
    """The image stem a ``<stem>__<object>`` file name belongs to (stems may contain '__')."""
    cut = name.rfind(SEPARATOR)
    while cut > 0:
        if name[:cut] in stems:
            return name[:cut]
        cut = name.rfind(SEPARATOR, 0, cut)
    return None


def group_by_stem(folder: Path, stems: set[str]) -> tuple[dict[str, list[Path]], list[str]]:
    """PNG files of ``folder`` grouped by image stem, and the names matching no image."""
    groups: dict[str, list[Path]] = {}
    orphans: list[str] = []
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    for path in (p for p in files if p.suffix.lower() == ".png" and p.is_file()):
        stem = _owner(path.stem, stems)
        if stem is None:
            orphans.append(path.name)
        else:
            groups.setdefault(stem, []).append(path)
    return groups, orphans


def _decode_masks(
    masks: tuple[tuple[str, Path], ...], ignore: tuple[Path, ...], height: int, width: int
) -> DecodedObjects:
    decoded = DecodedObjects()
    for name, path in masks:
        decoded.add(name, partial(read_mask_png, path, height, width), path.name)
    for path in ignore:
        decoded.add_ignore(partial(read_mask_png, path, height, width), path.name)
    return decoded


def index_masks(root: Path) -> list[ImageEntry]:
    """Index a PNG-mask folder; images without masks and masks without images are reported."""
    images = {p.stem: p for p in image_files(root / "images")}
    masks, orphans = group_by_stem(root / "masks", set(images))
    ignore, ignore_orphans = group_by_stem(root / "ignore", set(images))
    summarise_skipped("mask files without an image", orphans + ignore_orphans, root)
    summarise_skipped(
        "images without masks", [p.name for s, p in images.items() if s not in masks], root
    )
    return [
        ImageEntry(
            stem,
            images[stem],
            len(files),
            partial(
                _decode_masks,
                tuple((p.stem[len(stem) + len(SEPARATOR) :], p) for p in files),
                tuple(ignore.get(stem, ())),
            ),
        )
        for stem, files in masks.items()
    ]

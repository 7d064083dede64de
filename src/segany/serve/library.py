"""The images a project shows: files under IMAGES_DIR and uploaded files, named by id.

The API never takes a path. An image id maps to a name stored in the project, and the
name is resolved inside its folder only: names with ``..`` or absolute names are refused,
and so is a file whose real path (after following symlinks) leaves the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from ..atomic import atomic_path
from ..data.base import IMAGE_SUFFIXES
from ..errors import SeganyError
from ..images import read_image
from .store import NotFound, ProjectStore, StoredImage

# Decoded images kept in memory: the last few opened, enough for one user moving around.
DECODED_CACHE = 4
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


class NotAnImage(SeganyError):
    """An upload that cannot be decoded as a picture."""


def _inside(folder: Path, name: str) -> Path | None:
    """The file ``folder/name`` if it is a regular file really inside ``folder``, else None."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name or not name:
        return None
    path = folder / relative
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    if not real.is_relative_to(folder.resolve()) or not real.is_file():
        return None
    return path


def scan_folder(folder: Path, skip: Path | None = None) -> list[str]:
    """Image files under ``folder`` (recursively) as sorted POSIX names relative to it.

    Hidden files and folders, the ``skip`` folder (the project's own) and links that lead
    out of ``folder`` are left out.
    """
    names = []
    skip_real = skip.resolve() if skip is not None else None
    for directory, subdirs, files in os.walk(folder):
        here = Path(directory)
        subdirs[:] = [
            d for d in subdirs if not d.startswith(".") and (here / d).resolve() != skip_real
        ]
        for file in files:
            if file.startswith(".") or Path(file).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            name = (here / file).relative_to(folder).as_posix()
            if _inside(folder, name) is not None:
                names.append(name)
    return sorted(names)


def safe_file_name(name: str) -> str:
    """A harmless file name from an uploaded one: its last part, plain characters only."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE_CHARACTERS.sub("_", last).lstrip(".")[-100:]
    return cleaned or "image"


class ImageLibrary:
    """Finds, reads and stores the project's images.

    Args:
        store: the project store, where image ids live.
        images_dir: the served folder, or None to work with uploads only.
        project_dir: the project folder; uploads are kept in its ``uploads/``.
    """

    def __init__(self, store: ProjectStore, images_dir: Path | None, project_dir: Path) -> None:
        self.store = store
        self.images_dir = images_dir
        self.project_dir = project_dir
        self.uploads_dir = project_dir / "uploads"
        self._decoded: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def scan(self) -> None:
        """Register image files that appeared in ``images_dir`` since the last scan."""
        if self.images_dir is not None:
            self.store.add_images("folder", scan_folder(self.images_dir, self.project_dir))

    def path(self, image: StoredImage) -> Path:
        """The image's file, checked to be inside its folder; NotFound otherwise."""
        folder = self.images_dir if image.source == "folder" else self.uploads_dir
        path = None if folder is None else _inside(folder, image.name)
        if path is None:
            raise NotFound(f"the file of image {image.id} ({image.name}) is not available")
        return path

    def _stat_key(self, image: StoredImage) -> tuple[Path, tuple[str, int, int]]:
        """The image's path and a key that changes whenever its file does."""
        path = self.path(image)
        stat = path.stat()
        return path, (str(path), stat.st_mtime_ns, stat.st_size)

    def content_key(self, image: StoredImage) -> str:
        """SHA-256 of the image's file: names its embedding in caches (remembered while the
        file's size and modification time stay the same)."""
        path, key = self._stat_key(image)
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with self._lock:
            self._hashes[key] = digest
        return digest

    def pixels(self, image: StoredImage) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB, as the model sees it (EXIF orientation
        applied); the last few images read come from memory while their files are unchanged.
        Records the image's size in the store the first time."""
        path, key = self._stat_key(image)
        with self._lock:
            if key in self._decoded:
                self._decoded.move_to_end(key)
                return self._decoded[key]
        pixels = read_image(path)
        height, width = pixels.shape[:2]
        if (image.width, image.height) != (width, height):
            self.store.set_image_size(image.id, width, height)
        with self._lock:
            self._decoded[key] = pixels
            while len(self._decoded) > DECODED_CACHE:
                self._decoded.popitem(last=False)
        return pixels

    def with_size(self, image: StoredImage) -> StoredImage:
        """``image`` with its width and height known (reads it once if they are not)."""
        if image.width is not None and image.height is not None:
            return image
        height, width = self.pixels(image).shape[:2]
        return replace(image, width=width, height=height)

    def add_upload(self, file_name: str, data: bytes) -> StoredImage:
        """Keep an uploaded picture (``NotAnImage`` if it does not decode) and register it.

        Stored as ``<first 16 hex digits of its SHA-256>-<safe name>``; the same content
        uploaded again (under any name) is the same image.
        """
        digest = hashlib.sha256(data).hexdigest()[:16]
        known = sorted(self.uploads_dir.glob(f"{digest}-*"))
        target = known[0] if known else self.uploads_dir / f"{digest}-{safe_file_name(file_name)}"
        try:
            if known:
                pixels = read_image(target)
            else:
                with atomic_path(target) as temp:
                    temp.write_bytes(data)
                    pixels = read_image(temp)  # decoded before it is kept
        except SeganyError:
            raise NotAnImage(
                f"{safe_file_name(file_name)!r} is not an image that can be read "
                "(supported: JPEG, PNG, TIFF, WebP, BMP)"
            ) from None
        self.store.add_images("upload", [target.name])
        image = self.store.image_by_name("upload", target.name)
        self.store.set_image_size(image.id, pixels.shape[1], pixels.shape[0])
        return self.store.image(image.id)

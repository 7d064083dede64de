"""Atomic file writing: a reader sees either the old file or the complete new one.

Every output segany writes (masks, overlays, checkpoints, JSON) goes through a
temporary file in the target's own directory, is flushed to disk, and is then
renamed over the target with :func:`os.replace`, which is atomic on POSIX and
Windows when both paths are on the same file system.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "commit_file", "write_bytes_atomic", "write_text_atomic"]


def _temp_sibling(target: Path) -> Path:
    """A hidden, unused name beside ``target`` that keeps its suffix.

    The suffix is kept so that writers choosing a format by file name
    (Pillow, OpenCV, NumPy) still pick the right one.
    """
    while True:
        candidate = target.with_name(f".{target.stem}.{secrets.token_hex(6)}.tmp{target.suffix}")
        if not candidate.exists():
            return candidate


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk so a crash cannot leave it empty after the rename."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory``; not possible (nor needed) on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Durably move the finished file ``source`` onto ``target`` and return ``target``.

    Both must be in the same directory (same file system) for the rename to be atomic.
    """
    source, target = Path(source), Path(target)
    _fsync_file(source)
    os.replace(source, target)
    _fsync_dir(target.parent)
    return target


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically.

    The temporary file is a hidden sibling of ``path`` with the same suffix, not
    yet created: the caller creates it (so it gets the usual permissions). If the
    block raises, the temporary file is deleted, ``path`` is left as it was and
    the exception propagates. Parent directories of ``path`` are created.

    Example::

        with atomic_path("out/overlay.png") as tmp:
            Image.fromarray(rgb).save(tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(target)
    try:
        yield temp
        if not temp.is_file():
            raise FileNotFoundError(f"the writer did not create {temp} for {target}")
        commit_file(temp, target)
    except BaseException:
        _remove_quietly(temp)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding=encoding)
    return Path(path)

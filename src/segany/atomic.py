"""Atomic file writing: a reader sees either the old file or the complete new one.

Every output segany writes (masks, overlays, checkpoints, JSON) goes through a
temporary file in the target's own directory, is flushed to disk, and is then
renamed over the target with :func:`os.replace`, which is atomic on POSIX and
Windows when both paths are on the same file system.

Commands check their output locations with :func:`check_writable` before any work
starts, and write outputs that belong together with :func:`atomic_paths`, so that a
failure leaves either all of them or none.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from segany.errors import SeganyError

__all__ = [
    "atomic_path",
    "atomic_paths",
    "check_writable",
    "commit_file",
    "write_bytes_atomic",
    "write_text_atomic",
]

PathLike = str | os.PathLike[str]


def _temp_sibling(target: Path) -> Path:
    """A hidden, unused name beside ``target`` that keeps its suffix.

    The suffix is kept so that writers choosing a format by file name
    (Pillow, OpenCV, NumPy) still pick the right one.
    """
    while True:
        candidate = target.with_name(f".{target.stem}.{secrets.token_hex(6)}.tmp{target.suffix}")
        if not os.path.lexists(candidate):  # False, not an error, for a name too long
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


def commit_file(source: PathLike, target: PathLike) -> Path:
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
def atomic_paths(paths: Sequence[PathLike]) -> Iterator[list[Path]]:
    """Yield a temporary path per target; on success all replace their targets together.

    For the outputs of one command that belong together (a mask and its overlay):
    the caller writes every temporary file, and only when the block succeeds are
    they renamed into place, one after the other (renames in checked folders do not
    fail in practice). If the block raises, no target is touched: the temporary
    files are removed and the exception propagates. If a rename fails half way, the
    targets already replaced are removed too, so no half set of outputs is left.

    Each temporary path is a hidden sibling of its target with the same suffix, not
    yet created: the caller creates it. Parent folders are created as needed (and kept:
    another writer may be using them).
    """
    targets = [Path(p) for p in paths]
    if len({os.path.abspath(t) for t in targets}) != len(targets):
        raise ValueError(f"the same output appears twice in {[str(t) for t in targets]}")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    temps = [_temp_sibling(target) for target in targets]
    replaced: list[Path] = []
    try:
        yield temps
        for temp, target in zip(temps, targets, strict=True):
            if not temp.is_file():
                raise FileNotFoundError(f"the writer did not create {temp} for {target}")
            _fsync_file(temp)
        for temp, target in zip(temps, targets, strict=True):
            os.replace(temp, target)
            replaced.append(target)
        for directory in dict.fromkeys(target.parent for target in targets):
            _fsync_dir(directory)
    except BaseException:
        for path in (*temps, *replaced):
            _remove_quietly(path)
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically.

    The temporary file is a hidden sibling of ``path`` with the same suffix, not
    yet created: the caller creates it (so it gets the usual permissions). If the
    block raises, the temporary file is deleted, ``path`` is left as it was and
    the exception propagates. Parent directories of ``path`` are created.

    Example::

        with atomic_path("out/overlay.png") as tmp:
            Image.fromarray(rgb).save(tmp)
    """
    with atomic_paths([path]) as (temp,):
        yield temp


def check_writable(path: PathLike, option: str, *, folder: bool = False) -> Path:
    """``path`` as an output location that can be written; SeganyError (one line) if not.

    Called by commands before any work, so that an output that cannot be written
    fails at once rather than after minutes of model work. ``folder`` says whether
    ``path`` is a folder to write into (else a file). The folder that would hold the
    output must exist or be creatable (its nearest existing ancestor is a folder) and
    must accept a new file: this is tested by creating and removing one named as the
    output's temporary file would be, the only test that also covers read-only mounts,
    ACLs and names too long for the file system. Nothing is left behind: missing
    folders are not created here.

    ``option`` names the output in the message (``-o``, ``--overlay``).
    """
    target = Path(path)

    def refuse(reason: str) -> SeganyError:
        return SeganyError(f"cannot write {option} {str(path)!r}: {reason}")

    # os.path's tests, unlike Path's, answer False instead of raising on odd paths.
    if folder and os.path.lexists(target) and not os.path.isdir(target):
        raise refuse("it is a file; give a folder")
    if not folder and os.path.isdir(target):
        raise refuse("it is a folder; give a file name")
    existing = target if folder else target.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise refuse(f"{str(existing)!r} is a file, not a folder")
    probe = _temp_sibling(existing / (".segany-write-test" if folder else target.name))
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise refuse(f"cannot create a file in folder {str(existing)!r} ({reason})") from None
    probe.unlink()
    return target


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding=encoding)
    return Path(path)

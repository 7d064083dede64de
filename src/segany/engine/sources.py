"""Which images a run works on, and where each one's outputs go.

Shared by ``segany everything`` and ``segany engine``: an input is an image file, a folder
of images (not recursive), a glob (``**`` recurses) or a list file (``.txt``, ``.lst``,
``.list``: one image path per line, relative paths from the list file's folder, blank lines
and lines starting with ``#`` ignored). A :class:`Job` pairs an image with its main output,
whose presence marks the image finished, so a rerun skips it.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import check_writable
from ..data.base import IMAGE_SUFFIXES
from ..errors import SeganyError

LIST_SUFFIXES = (".txt", ".lst", ".list")
INPUT_FORMS = "an image, a folder of images, a glob such as 'photos/*.jpg' or a .txt list"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def read_list_file(path: Path) -> list[Path]:
    """The image paths listed in ``path`` (see the module docstring), in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SeganyError(
            f"list file {path} is not UTF-8 text; give one image path per line"
        ) from None
    except OSError as error:
        raise SeganyError(f"cannot read list file {path}: {error.strerror}") from None
    entries = [line.strip() for line in text.splitlines()]
    paths = [Path(e).expanduser() for e in entries if e and not e.startswith("#")]
    paths = [p if p.is_absolute() else path.parent / p for p in paths]
    if not paths:
        raise SeganyError(f"list file {path} lists no images; give one image path per line")
    if not any(p.is_file() for p in paths):
        raise SeganyError(
            f"none of the {len(paths)} files listed in {path} exists (relative paths are "
            f"read from the list file's folder, {path.parent})"
        )
    return paths


def find_inputs(pattern: str, outdir: Path) -> list[Path]:
    """Image files named by ``pattern``, sorted; never files inside ``outdir``.

    A folder gives its files with an image suffix (not recursive); a list file gives the
    files it lists (missing ones too, so that they are reported as failures); another
    existing file is an image; anything else is a glob (``**`` recurses) and gives every
    file it matches.
    """
    path = Path(pattern)
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            found = read_list_file(path)
        else:
            return [path]
    elif path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    return sorted({p for p in found if not _inside(p, outdir)})


def require_inputs(pattern: str, outdir: Path) -> list[Path]:
    """:func:`find_inputs`, or a SeganyError ("no images found ...") saying why none were."""
    paths = find_inputs(pattern, outdir)
    if paths:
        return paths
    path = Path(pattern)
    if path.is_dir():
        suffixes = ", ".join(IMAGE_SUFFIXES)
        reason = f"folder {pattern!r} has no image files ({suffixes}; not recursive)"
    elif glob.has_magic(pattern):
        reason = f"nothing matches {pattern!r}"
    else:
        reason = f"{pattern!r} does not exist"
    raise SeganyError(f"no images found: {reason}; give {INPUT_FORMS} of image paths")


def image_ids(paths: list[Path]) -> list[int]:
    """COCO image ids: the number ending each file stem (as in COCO's and SA-1B's names),
    with the next free numbers for stems without one; positions from 1 if numbers repeat."""
    numbers = [re.search(r"(\d+)$", p.stem) for p in paths]
    found = [int(n.group(1)) for n in numbers if n]
    if len(set(found)) != len(found):
        return list(range(1, len(paths) + 1))
    spare = iter(range(max(found, default=0) + 1, max(found, default=0) + len(paths) + 1))
    return [int(n.group(1)) if n else next(spare) for n in numbers]


@dataclass(frozen=True)
class Job:
    """One input image and where its outputs go."""

    path: Path
    image_id: int
    main_output: Path  # its presence marks the image done
    overlay: Path | None = None

    def done(self) -> bool:
        return self.main_output.exists() and (self.overlay is None or self.overlay.exists())


def plan_jobs(
    paths: list[Path],
    main_output: Callable[[str], Path],
    overlay: Callable[[str], Path] | None = None,
) -> list[Job]:
    """A Job per input, its outputs named from the file stem by ``main_output`` (and
    ``overlay``); SeganyError if two inputs would write the same outputs."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise SeganyError(
                f"{seen[path.stem]} and {path} would write the same outputs ({path.stem}.*); "
                "rename one or run them into different output folders"
            )
        seen[path.stem] = path
    return [
        Job(
            path=path,
            image_id=image_id,
            main_output=main_output(path.stem),
            overlay=overlay(path.stem) if overlay is not None else None,
        )
        for path, image_id in zip(paths, image_ids(paths), strict=True)
    ]


def output_folder(path: str | Path, option: str = "-o") -> Path:
    """``path`` as an output folder (it may not exist yet); SeganyError if it is a file or
    cannot be written (checked before any work, see :func:`segany.atomic.check_writable`)."""
    return check_writable(path, option, folder=True)

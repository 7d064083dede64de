"""Model checkpoints on the user's machine: the known downloads, where they live, fetching them.

Checkpoints are kept in :func:`cache_dir` (``$SEGANY_HOME/checkpoints`` or the
platform's user cache folder). :func:`download` streams a file to
``<name>.part``, resumes an interrupted download with an HTTP ``Range``
request, checks the SHA-256 sum and only then renames the file into place, so
a checkpoint that exists under its final name is always complete.

A file can still be damaged later (a disk error, a copy gone wrong): a checkpoint only
counts as downloaded once its SHA-256 has been checked, which :func:`download` records
in ``<file>.sha256`` beside it (with the file's size and time, so it is checked again
when the file changes). A file put there by hand is checked once, on first use or by
``segany weights list``; a corrupt one is named, with the command that fetches it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import platformdirs
from tqdm import tqdm

from segany.atomic import commit_file, write_text_atomic
from segany.errors import SeganyError

__all__ = [
    "WEIGHTS",
    "WeightsInfo",
    "cache_dir",
    "checkpoint_state",
    "download",
    "get_info",
    "is_downloaded",
    "weights_path",
]

CHUNK_BYTES = 1 << 20
HOME_VARIABLE = "SEGANY_HOME"
USER_AGENT = "segany"


class _Hasher(Protocol):
    """The part of a :mod:`hashlib` object used here."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class WeightsInfo:
    """One downloadable checkpoint.

    Attributes:
        name: registry key, e.g. ``"sam_vit_b"``.
        model_type: the registry model it is for: ``vit_h``, ``vit_l``, ``vit_b``,
            ``vit_t`` (MobileSAM) or a SAM 2 model (``sam2.1_t``, ``sam2_b+``, ...).
        url: where to download it.
        sha256: lowercase hex SHA-256 of the whole file.
        size_bytes: exact file size.
        file_name: name of the file in :func:`cache_dir`.
        description: one line for ``segany weights list``.
    """

    name: str
    model_type: str
    url: str
    sha256: str
    size_bytes: int
    file_name: str
    description: str


FAIR = "https://dl.fbaipublicfiles.com/segment_anything"
FAIR_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2"

# SHA-256 sums and sizes of the published files, as pinned independently by many
# projects that download them (e.g. micro_sam's model registry lists all four sums).
# The hex in Meta's file names is not a prefix of the SHA-256.
WEIGHTS: dict[str, WeightsInfo] = {
    info.name: info
    for info in (
        WeightsInfo(
            name="sam_vit_h",
            model_type="vit_h",
            url=f"{FAIR}/sam_vit_h_4b8939.pth",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size_bytes=2_564_550_879,
            file_name="sam_vit_h_4b8939.pth",
            description="SAM ViT-H (636M parameters), Meta's most accurate model",
        ),
        WeightsInfo(
            name="sam_vit_l",
            model_type="vit_l",
            url=f"{FAIR}/sam_vit_l_0b3195.pth",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size_bytes=1_249_524_607,
            file_name="sam_vit_l_0b3195.pth",
            description="SAM ViT-L (308M parameters), nearly as accurate as ViT-H",
        ),
        WeightsInfo(
            name="sam_vit_b",
            model_type="vit_b",
            url=f"{FAIR}/sam_vit_b_01ec64.pth",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size_bytes=375_042_383,
            file_name="sam_vit_b_01ec64.pth",
            description="SAM ViT-B (91M parameters), the fastest of Meta's SAM models",
        ),
        WeightsInfo(
            name="mobile_sam",
            model_type="vit_t",
            url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            size_bytes=40_728_226,
            file_name="mobile_sam.pt",
            description="MobileSAM (TinyViT encoder, 10M parameters), fast on CPU",
        ),
    )
}

# Meta's SAM 2 (released 2024-07-28, folder 072824) and SAM 2.1 (2024-09-28, 092824)
# checkpoints: (version, size, registry model, bytes, SHA-256). Sums and sizes as pinned
# by projects that download these files (micro_sam's SAM 2 registry, 3D Slicer's
# SegmentWithSAM) and in the Git LFS pointers of the same files in Hugging Face's
# facebook/sam2*-hiera-* repositories.
_SAM2_FILES = (
    ("2.1", "tiny", "sam2.1_t", 156_008_466,
     "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"),
    ("2.1", "small", "sam2.1_s", 184_416_285,
     "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38"),
    ("2.1", "base_plus", "sam2.1_b+", 323_606_802,
     "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5"),
    ("2.1", "large", "sam2.1_l", 898_083_611,
     "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318"),
    ("2", "tiny", "sam2_t", 155_906_050,
     "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125"),
    ("2", "small", "sam2_s", 184_309_650,
     "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3"),
    ("2", "base_plus", "sam2_b+", 323_493_298,
     "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071"),
    ("2", "large", "sam2_l", 897_952_466,
     "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b"),
)  # fmt: skip
_SAM2_PARAMETERS = {"tiny": "39M", "small": "46M", "base_plus": "81M", "large": "224M"}


def _sam2_weights(version: str, size: str, model: str, size_bytes: int, sha256: str) -> WeightsInfo:
    prefix, folder = ("sam2.1", "092824") if version == "2.1" else ("sam2", "072824")
    name = f"{prefix}_hiera_{size}"
    return WeightsInfo(
        name=name,
        model_type=model,
        url=f"{FAIR_SAM2}/{folder}/{name}.pt",
        sha256=sha256,
        size_bytes=size_bytes,
        file_name=f"{name}.pt",
        description=f"SAM {version} Hiera-{size.replace('_plus', '+').title()} "
        f"({_SAM2_PARAMETERS[size]} parameters)",
    )


WEIGHTS.update((info.name, info) for info in (_sam2_weights(*row) for row in _SAM2_FILES))


# --------------------------------------------------------------------------- where


def get_info(name: str) -> WeightsInfo:
    """The entry for checkpoint ``name`` (``sam2.1_hiera_tiny``) or for the registry model
    it is the weights of (``sam2.1_t``); SeganyError listing the known names if unknown."""
    if name in WEIGHTS:
        return WEIGHTS[name]
    for info in WEIGHTS.values():
        if info.model_type == name:
            return info
    known = ", ".join(sorted(WEIGHTS))
    raise SeganyError(f"unknown checkpoint {name!r}; known: {known}")


def cache_dir() -> Path:
    """Folder holding downloaded checkpoints.

    ``$SEGANY_HOME/checkpoints`` when ``SEGANY_HOME`` is set and not empty,
    otherwise ``<user cache dir>/segany/checkpoints`` (e.g. ``~/.cache/segany``
    on Linux). Not created here.
    """
    home = os.environ.get(HOME_VARIABLE)
    base = Path(home).expanduser() if home else Path(platformdirs.user_cache_dir("segany"))
    return base / "checkpoints"


def weights_path(name: str) -> Path:
    """Where checkpoint ``name`` lives (or would live once downloaded)."""
    return cache_dir() / get_info(name).file_name


def _verified_path(path: Path) -> Path:
    """Where the record of ``path``'s checked SHA-256 is kept."""
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, sha256: str) -> str:
    """What the record says: the sum, and the size and time of the file it was checked on."""
    stat = path.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _record_verified(path: Path, sha256: str) -> None:
    """Remember that ``path`` has ``sha256``; a read-only cache just means checking again."""
    with contextlib.suppress(OSError):
        write_text_atomic(_verified_path(path), _stamp(path, sha256))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_state(name: str) -> str:
    """``"downloaded"``, ``"not downloaded"`` or ``"corrupt"`` for checkpoint ``name``.

    A file of the wrong size is not downloaded (yet: :func:`download` resumes or replaces
    it). One of the right size is downloaded once its SHA-256 matches the registry; the
    sum is computed once (seconds for gigabytes) and recorded, see the module docstring.
    """
    info = get_info(name)
    path = weights_path(name)
    try:
        if not path.is_file() or path.stat().st_size != info.size_bytes:
            return "not downloaded"
        record = _verified_path(path)
        if record.is_file() and record.read_text() == _stamp(path, info.sha256):
            return "downloaded"
        if _file_sha256(path) != info.sha256:
            return "corrupt"
    except OSError as err:
        raise SeganyError(
            f"cannot read checkpoint {path}: {err.strerror or err}; check the file's "
            f"permissions or set {HOME_VARIABLE} to another folder"
        ) from None
    _record_verified(path, info.sha256)
    return "downloaded"


def is_downloaded(name: str) -> bool:
    """True if checkpoint ``name`` is in the cache, complete and intact (its SHA-256
    checked, see :func:`checkpoint_state`)."""
    return checkpoint_state(name) == "downloaded"


def corrupt_error(name: str) -> SeganyError:
    """The error for a cached checkpoint whose SHA-256 does not match: what to do."""
    return SeganyError(
        f"checkpoint {weights_path(name)} is corrupt (its SHA-256 does not match {name}'s); "
        f"fetch it again with: segany weights download {name} --force (or delete the file)"
    )


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


# --------------------------------------------------------------------------- download


def download(name: str, *, force: bool = False, progress: bool = True, timeout: float = 30) -> Path:
    """Download checkpoint ``name`` into :func:`cache_dir` and return its path.

    Returns at once if the file is already there and intact (unless ``force``); a
    corrupt one (right size, wrong SHA-256) is an error saying how to fetch it again.
    An interrupted download leaves ``<file>.part`` behind and the next call resumes it
    (``force`` starts over instead). The file gets its final name only after its
    SHA-256 matches the registry.

    Args:
        name: a key of :data:`WEIGHTS`.
        force: download again even if the file is present.
        progress: show a progress bar on stderr.
        timeout: seconds to wait for the connection and for each read.

    Raises:
        SeganyError: unknown name, network failure, checksum mismatch, a corrupt
            file in the cache, or the file cannot be written.
    """
    info = get_info(name)
    final = weights_path(name)
    if not force:
        state = checkpoint_state(name)
        if state == "downloaded":
            return final
        if state == "corrupt":  # not replaced unasked: it may be the user's own copy
            raise corrupt_error(name)
    part = _part_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if force:
            part.unlink(missing_ok=True)
        digest = _fetch(info, part, progress=progress, timeout=timeout)
        _verify(info, part, digest)
        commit_file(part, final)
        _record_verified(final, digest)
        return final
    except OSError as err:
        raise SeganyError(
            f"cannot save checkpoint {name} to {final.parent}: {err.strerror or err}; "
            f"free some disk space or set {HOME_VARIABLE} to another folder"
        ) from err


def _network_error(info: WeightsInfo, reason: str) -> SeganyError:
    return SeganyError(
        f"could not download {info.name} from {info.url}: {reason}; check the connection, "
        "or download it yourself and pass --checkpoint FILE"
    )


def _describe(err: BaseException) -> str:
    """A short, one-line reason for a network failure."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return " ".join(str(err).split()) or type(err).__name__


def _request(info: WeightsInfo, start: int, timeout: float) -> http.client.HTTPResponse:
    """Open ``info.url``, asking for the bytes from ``start`` on when ``start > 0``."""
    request = urllib.request.Request(info.url, headers={"User-Agent": USER_AGENT})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and start:  # our .part is not a prefix of the file: start over
            return _request(info, 0, timeout)
        raise _network_error(info, _describe(err)) from err
    except (OSError, http.client.HTTPException) as err:
        raise _network_error(info, _describe(err)) from err


def _resumed_from(response: http.client.HTTPResponse, start: int) -> int:
    """Offset the response body starts at: ``start`` for a matching 206, else 0.

    Servers that ignore ``Range`` answer 200 with the whole file.
    """
    if start and response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        if content_range.startswith(f"bytes {start}-"):
            return start
    return 0


def _chunks(info: WeightsInfo, response: http.client.HTTPResponse) -> Iterator[bytes]:
    """Body of ``response`` in chunks; read failures become the download error."""
    while True:
        try:
            chunk = response.read(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as err:
            raise _network_error(info, _describe(err)) from err
        if not chunk:
            return
        yield chunk


def _hash_prefix(part: Path, length: int) -> _Hasher:
    """SHA-256 state after the first ``length`` bytes of ``part``."""
    digest = hashlib.sha256()
    with open(part, "rb") as handle:
        while length > 0:
            block = handle.read(min(CHUNK_BYTES, length))
            if not block:
                break
            digest.update(block)
            length -= len(block)
    return digest


def _fetch(info: WeightsInfo, part: Path, *, progress: bool, timeout: float) -> str:
    """Complete ``part`` from the network; returns the hex SHA-256 of the whole file."""
    have = part.stat().st_size if part.is_file() else 0
    if have > info.size_bytes:  # not a prefix of this file: start over
        have = 0
    if have == info.size_bytes:
        return _hash_prefix(part, have).hexdigest()
    with _request(info, have, timeout) as response:
        start = _resumed_from(response, have)
        digest = _hash_prefix(part, start) if start else hashlib.sha256()
        with open(part, "r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            _copy(info, response, out, digest, start, progress)
    got = part.stat().st_size
    if got < info.size_bytes:
        raise _network_error(
            info,
            f"the connection closed after {got} of {info.size_bytes} bytes; run again to resume",
        )
    return digest.hexdigest()


def _copy(
    info: WeightsInfo,
    response: http.client.HTTPResponse,
    out: BinaryIO,
    digest: _Hasher,
    start: int,
    progress: bool,
) -> None:
    bar = tqdm(
        total=info.size_bytes,
        initial=start,
        desc=info.name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        leave=True,
    )
    with bar:
        for chunk in _chunks(info, response):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


def _verify(info: WeightsInfo, part: Path, actual: str) -> None:
    """Raise (and delete ``part``) unless ``actual`` is the registry's SHA-256."""
    if actual == info.sha256:
        return
    part.unlink(missing_ok=True)
    raise SeganyError(
        f"checksum mismatch for {info.name} downloaded from {info.url}: expected sha256 "
        f"{info.sha256}, got {actual}; the file was deleted, run the download again"
    )

"""Annotating one image: the work both runners (in-process and Ray) do per image.

An :class:`Annotator` loads the model once and turns an image, given as a path or as the
bytes of its file, into a :class:`Result`: the SA-1B-style JSON document (as text, ready to
be written) or the reason it failed. Both runners call the same code, so they give the
same masks; only where it runs differs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..amg_options import AMG_OPTIONS, AmgOptions
from ..errors import SeganyError
from ..images import read_image
from ..masks.formats import sa1b_document
from ..sam2_automatic_mask_generator import automatic_mask_generator_for

# SA-1B documents carry COCO RLE, which the generator writes fastest from uncompressed RLE.
OUTPUT_MODE = "uncompressed_rle"


@dataclass(frozen=True)
class ModelSpec:
    """What each worker loads: a registry model and/or a checkpoint, on a device, and how
    the automatic mask generator runs it: its ``options`` (their ``output_mode`` is
    replaced by :data:`OUTPUT_MODE`), ``precision`` and ``compile`` (see
    :class:`~segany.automatic_mask_generator.SamAutomaticMaskGenerator` and SAM 2's)."""

    model: str | None = None
    checkpoint: str | None = None
    device: str = "auto"
    options: AmgOptions = field(default_factory=AmgOptions)
    precision: str = "auto"
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a Ray actor's arguments); :meth:`from_dict` reads it back."""
        family = next(name for name, kind in AMG_OPTIONS.items() if type(self.options) is kind)
        return {**asdict(self), "family": family}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        fields = {key: value for key, value in data.items() if key != "family"}
        options = AMG_OPTIONS[data.get("family", "sam")](**data["options"])
        return cls(**{**fields, "options": options})

    def generator_options(self) -> dict[str, Any]:
        """The generator's keyword arguments (less the model)."""
        options = {**self.options.to_dict(), "output_mode": OUTPUT_MODE}
        return {**options, "precision": self.precision, "compile": self.compile}


@dataclass(frozen=True)
class Task:
    """One image to annotate: ``path`` names it (and is read unless ``data`` holds the
    file's bytes); ``image_id`` and the file name go into its document."""

    path: str
    image_id: int
    data: bytes | None = None


@dataclass(frozen=True)
class Result:
    """The outcome for one image: ``document`` (SA-1B JSON text) if it worked, else
    ``error`` (one line). ``worker`` is the id of the process that did it."""

    path: str
    document: str = ""
    error: str = ""
    masks: int = 0
    seconds: float = 0.0
    worker: int = 0

    @property
    def ok(self) -> bool:
        return not self.error


def one_line(error: BaseException) -> str:
    """An exception as one line: its message, or its type for unexpected errors."""
    text = " ".join(str(error).split())
    return text if isinstance(error, SeganyError) else f"{type(error).__name__}: {text}"


def decode_image(data: bytes, name: str) -> Any:
    """The (H, W, 3) uint8 RGB pixels of an image file's bytes, decoded exactly as
    :func:`segany.images.read_image` decodes the file ``name``; errors name ``name``."""
    # read_image needs a file (Pillow, tifffile and EXIF handling all take paths); a
    # temporary copy keeps one decoder for both runners.
    with tempfile.TemporaryDirectory(prefix="segany-engine-") as folder:
        temp = Path(folder) / f"image{Path(name).suffix}"
        temp.write_bytes(data)
        try:
            return read_image(temp)
        except SeganyError as error:
            raise SeganyError(str(error).replace(str(temp), name)) from None


class Annotator:
    """Loads the model once (``spec``); :meth:`__call__` annotates one image."""

    def __init__(self, spec: ModelSpec) -> None:
        from ..loading import load_model  # the model stack is imported where it runs

        self.generator = automatic_mask_generator_for(
            load_model(spec.model, spec.checkpoint, spec.device), **spec.generator_options()
        )

    def __call__(self, task: Task) -> Result:
        """The image's SA-1B document, or the reason it could not be annotated.

        An unreadable image, or any error while segmenting it, becomes a failed Result
        rather than an exception, so one bad image never stops a run.
        """
        start = time.perf_counter()
        try:
            if task.data is None:
                image = read_image(task.path)
            else:
                image = decode_image(task.data, task.path)
            records = self.generator.generate(image)
        except Exception as error:  # every failure is reported per image, not raised
            return Result(task.path, error=one_line(error), worker=os.getpid())
        height, width = image.shape[:2]
        document = sa1b_document(records, task.image_id, Path(task.path).name, height, width)
        return Result(
            task.path,
            document=json.dumps(document, separators=(",", ":")),
            masks=len(records),
            seconds=time.perf_counter() - start,
            worker=os.getpid(),
        )

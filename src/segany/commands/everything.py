"""``segany everything``: automatic masks for every object in one or many images.

Outputs in OUTDIR, one per image (named after the image file's stem):

* ``--format sa1b`` (default): ``STEM.json``, an SA-1B-style document with COCO RLE masks;
* ``--format coco``: ``coco_parts/STEM.json`` per image (SA-1B documents, kept so a rerun
  need not redo finished images), assembled into ``instances.json`` at the end;
* ``--format png``: the official ``scripts/amg.py`` layout, ``STEM/0.png, 1.png, ...`` and
  ``STEM/metadata.csv`` (written last: it marks the folder complete);
* ``--overlay``: also ``STEM.overlay.jpg``, the masks in colour over the image.

Every file is written atomically, so an image whose outputs all exist is finished and is
skipped on a rerun (unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..automatic_mask_generator import SamAutomaticMaskGenerator, check_options
from ..errors import SeganyError
from ..images import read_image
from ..mask_formats import (
    coco_document,
    sa1b_document,
    write_amg_folder,
    write_json,
    write_overlay,
)
from .common import add_model_arguments, inference_options, model_from_args

FORMATS = ("sa1b", "coco", "png")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp"}
COCO_PARTS = "coco_parts"
COCO_FILE = "instances.json"
OVERLAY_SUFFIX = ".overlay.jpg"

# Generator options offered as flags (point_grids cannot be given on a command line).
AMG_OPTIONS: dict[str, tuple[type, str]] = {
    "points_per_side": (int, "grid points along each side of the image"),
    "points_per_batch": (int, "points run through the model together (memory vs speed)"),
    "pred_iou_thresh": (float, "keep masks whose predicted IoU is above this (0 disables)"),
    "stability_score_thresh": (float, "keep masks at least this stable (0 disables)"),
    "stability_score_offset": (float, "logit shift used to measure stability"),
    "box_nms_thresh": (float, "box IoU above which duplicate masks are removed"),
    "crop_n_layers": (int, "extra layers of image crops (layer i has 4**i crops)"),
    "crop_nms_thresh": (float, "box IoU above which duplicates across crops are removed"),
    "crop_overlap_ratio": (float, "overlap of first-layer crops, fraction of the short side"),
    "crop_n_points_downscale_factor": (int, "points per side shrink by this per crop layer"),
    "min_mask_region_area": (int, "fill holes and drop islands smaller than this (pixels)"),
}
# Uncompressed RLE is cheap to draw and converts to COCO RLE when written.
OUTPUT_MODE = {"sa1b": "uncompressed_rle", "coco": "uncompressed_rle", "png": "binary_mask"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``everything`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "everything",
        help="automatic masks for everything in images",
        description="Find masks for every object in INPUT (an image, a folder of images, or a "
        "glob such as 'photos/*.jpg') with a grid of point prompts, as SAM's automatic mask "
        "generator. Finished images are skipped on a rerun.",
        epilog="Exit status: 0 on success, 1 if some images could not be read (they are "
        "skipped and listed), 2 for bad options or no images.",
    )
    parser.add_argument("input", metavar="INPUT", help="image file, folder, or glob pattern")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="sa1b",
        help="sa1b: STEM.json per image (default); coco: one instances.json for all images; "
        "png: STEM/N.png per mask plus STEM/metadata.csv (the official amg.py layout)",
    )
    parser.add_argument(
        "--overlay", action="store_true", help=f"also write STEM{OVERLAY_SUFFIX}, masks in colour"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo images whose outputs already exist"
    )
    defaults = inspect.signature(SamAutomaticMaskGenerator).parameters
    group = parser.add_argument_group("mask generator (defaults as SAM's)")
    for name, (kind, text) in AMG_OPTIONS.items():
        default = defaults[name].default
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=default,
            metavar="N" if kind is int else "X",
            help=f"{text} (default: {default:.4g})",
        )
    add_model_arguments(parser, precision=True)
    parser.set_defaults(run=run)


# -------------------------------------------------------------------------------------
# Inputs and per-image outputs
# -------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def find_inputs(pattern: str, outdir: Path) -> list[Path]:
    """Image files named by ``pattern``, sorted; never files inside ``outdir``.

    A folder gives its files with an image suffix (not recursive); anything else that is not
    an existing file is a glob (``**`` recurses) and gives every file it matches.
    """
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    return sorted(p for p in found if not _inside(p, outdir))


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
    overlay: Path | None

    def done(self) -> bool:
        return self.main_output.exists() and (self.overlay is None or self.overlay.exists())


def _main_output(outdir: Path, stem: str, fmt: str) -> Path:
    if fmt == "png":
        return outdir / stem / "metadata.csv"
    if fmt == "coco":
        return outdir / COCO_PARTS / f"{stem}.json"
    return outdir / f"{stem}.json"


def plan_jobs(paths: list[Path], outdir: Path, fmt: str, overlay: bool) -> list[Job]:
    """A Job per input; SeganyError if two inputs would write the same outputs."""
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
            main_output=_main_output(outdir, path.stem, fmt),
            overlay=outdir / f"{path.stem}{OVERLAY_SUFFIX}" if overlay else None,
        )
        for path, image_id in zip(paths, image_ids(paths), strict=True)
    ]


def write_outputs(job: Job, fmt: str, image: np.ndarray, records: list[dict[str, Any]]) -> None:
    """All outputs of one image; the main output last, as the completion mark."""
    if job.overlay is not None:
        write_overlay(job.overlay, image, records)
    if fmt == "png":
        write_amg_folder(job.main_output.parent, records)
        return
    height, width = image.shape[:2]
    document = sa1b_document(records, job.image_id, job.path.name, height, width)
    write_json(job.main_output, document)


def assemble_coco(jobs: list[Job], outdir: Path) -> Path:
    """``instances.json`` from the per-image documents of every finished job, in order."""
    documents = []
    for job in jobs:
        if job.main_output.exists():
            document = json.loads(job.main_output.read_text())
            document["image"]["image_id"] = job.image_id  # ids of this run's input set
            documents.append(document)
    return write_json(outdir / COCO_FILE, coco_document(documents))


# -------------------------------------------------------------------------------------
# Running
# -------------------------------------------------------------------------------------


def _generator_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in AMG_OPTIONS}
    options["output_mode"] = OUTPUT_MODE[args.format]
    check_options(**options)  # bad options fail before the model loads
    return {**options, **inference_options(args)}


def _output_dir(path: str) -> Path:
    outdir = Path(path)
    if outdir.exists() and not outdir.is_dir():
        raise SeganyError(f"output {path!r} is a file; give a folder for -o")
    return outdir


def run(args: argparse.Namespace) -> int:
    """Run ``segany everything``; returns the exit status (see the parser's epilog)."""
    options = _generator_options(args)
    outdir = _output_dir(args.output)
    paths = find_inputs(args.input, outdir)
    if not paths:
        raise SeganyError(
            f"no images found at {args.input!r}; give an image, a folder of images "
            "or a glob such as 'photos/*.jpg'"
        )
    jobs = plan_jobs(paths, outdir, args.format, args.overlay)
    todo = [job for job in jobs if args.overwrite or not job.done()]
    outdir.mkdir(parents=True, exist_ok=True)

    generator: SamAutomaticMaskGenerator | None = None  # loaded only if there is work
    failed: list[tuple[Path, str]] = []
    masks = 0
    for job in tqdm(todo, desc="everything", unit="image", file=sys.stderr, disable=None):
        try:
            image = read_image(job.path)
        except SeganyError as error:
            tqdm.write(f"segany everything: skipping {job.path}: {error}", file=sys.stderr)
            failed.append((job.path, str(error)))
            continue
        if generator is None:
            generator = SamAutomaticMaskGenerator(model_from_args(args), **options)
        records = generator.generate(image)
        write_outputs(job, args.format, image, records)
        masks += len(records)

    if args.format == "coco":
        coco_file = assemble_coco(jobs, outdir)
    _print_summary(len(jobs), len(todo) - len(failed), masks, failed, outdir)
    if args.format == "coco":
        print(f"COCO instances: {coco_file}")
    return 1 if failed else 0


def _print_summary(
    n_images: int, n_done: int, n_masks: int, failed: list[tuple[Path, str]], outdir: Path
) -> None:
    skipped = n_images - n_done - len(failed)
    print(
        f"{n_images} image(s): {n_done} segmented ({n_masks} masks), "
        f"{skipped} already done, {len(failed)} unreadable; output in {outdir}"
    )
    for path, _ in failed:
        print(f"unreadable: {path}")

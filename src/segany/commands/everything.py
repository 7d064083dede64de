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
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..amg_options import AmgOptions
from ..atomic import atomic_paths
from ..engine.sources import Job, output_folder, require_inputs
from ..engine.sources import plan_jobs as plan_jobs_for
from ..errors import SeganyError
from ..images import read_image
from ..masks.formats import (
    coco_document,
    sa1b_document,
    write_amg_folder,
    write_json,
    write_overlay,
)
from ..sam2_automatic_mask_generator import automatic_mask_generator_for
from .common import (
    add_amg_arguments,
    add_model_arguments,
    amg_options,
    inference_options,
    model_from_args,
)

FORMATS = ("sa1b", "coco", "png")
COCO_PARTS = "coco_parts"
COCO_FILE = "instances.json"
OVERLAY_SUFFIX = ".overlay.jpg"

# Uncompressed RLE is cheap to draw and converts to COCO RLE when written.
OUTPUT_MODE = {"sa1b": "uncompressed_rle", "coco": "uncompressed_rle", "png": "binary_mask"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``everything`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "everything",
        help="automatic masks for everything in images",
        description="Find masks for every object in INPUT (an image, a folder of images, a "
        "glob such as 'photos/*.jpg' or a .txt file listing image paths) with a grid of point "
        "prompts, as SAM's automatic mask generator. Finished images are skipped on a rerun.",
        epilog="Exit status: 0 on success, 1 if some images could not be read (they are "
        "skipped and listed), 2 for bad options or no images.",
    )
    parser.add_argument(
        "input", metavar="INPUT", help="image file, folder, glob pattern or .txt list of images"
    )
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
    add_amg_arguments(parser)
    add_model_arguments(parser, precision=True)
    parser.set_defaults(run=run)


# -------------------------------------------------------------------------------------
# Inputs and per-image outputs
# -------------------------------------------------------------------------------------


def _main_output(outdir: Path, stem: str, fmt: str) -> Path:
    if fmt == "png":
        return outdir / stem / "metadata.csv"
    if fmt == "coco":
        return outdir / COCO_PARTS / f"{stem}.json"
    return outdir / f"{stem}.json"


def plan_jobs(paths: list[Path], outdir: Path, fmt: str, overlay: bool) -> list[Job]:
    """A Job per input; SeganyError if two inputs would write the same outputs."""
    return plan_jobs_for(
        paths,
        lambda stem: _main_output(outdir, stem, fmt),
        (lambda stem: outdir / f"{stem}{OVERLAY_SUFFIX}") if overlay else None,
    )


def write_outputs(job: Job, fmt: str, image: np.ndarray, records: list[dict[str, Any]]) -> None:
    """All outputs of one image; the main output last, as the completion mark.

    The JSON formats write the overlay and the document together (both or neither);
    the PNG folder has many files and relies on its metadata.csv, written last.
    """
    if fmt == "png":
        if job.overlay is not None:
            write_overlay(job.overlay, image, records)
        write_amg_folder(job.main_output.parent, records)
        return
    height, width = image.shape[:2]
    document = sa1b_document(records, job.image_id, job.path.name, height, width)
    overlay = [job.overlay] if job.overlay is not None else []
    with atomic_paths([*overlay, job.main_output]) as temps:  # renamed in this order
        if overlay:
            write_overlay(temps[0], image, records)
        write_json(temps[-1], document)


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


def run(args: argparse.Namespace) -> int:
    """Run ``segany everything``; returns the exit status (see the parser's epilog)."""
    options = amg_options(args, OUTPUT_MODE[args.format])
    inference = inference_options(args)
    outdir = output_folder(args.output)
    paths = require_inputs(args.input, outdir)
    jobs = plan_jobs(paths, outdir, args.format, args.overlay)
    todo = [job for job in jobs if args.overwrite or not job.done()]
    outdir.mkdir(parents=True, exist_ok=True)

    generator = None  # loaded only if there is work
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
            generator = automatic_mask_generator_for(
                model_from_args(args), **options.to_dict(), **inference
            )
        records = generator.generate(image)
        write_outputs(job, args.format, image, records)
        masks += len(records)

    if args.format == "coco":
        coco_file = assemble_coco(jobs, outdir)
    _print_summary(len(jobs), len(todo) - len(failed), masks, failed, outdir)
    if masks == 0 and len(todo) > len(failed):
        _hint_no_masks(args, options)
    if args.format == "coco":
        print(f"COCO instances: {coco_file}")
    return 1 if failed else 0


def _hint_no_masks(args: argparse.Namespace, options: AmgOptions) -> None:
    """One line on stderr when the quality filters left no mask at all."""
    if not (options.pred_iou_thresh or options.stability_score_thresh):
        return
    hint = (
        "segany everything: no mask passed the quality filters (predicted IoU > "
        f"{options.pred_iou_thresh}, stability >= {options.stability_score_thresh}); lower them "
        "(--pred-iou-thresh 0 --stability-score-thresh 0 keeps every mask)"
    )
    if args.checkpoint is None and args.model in (None, "default"):
        # The bundled model scores its masks well under SAM's thresholds (MODEL_CARD.md).
        hint += ", or use a SAM checkpoint (--model vit_b): the default model scores its masks low"
    print(hint, file=sys.stderr)


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

"""``segany engine``: the data engine (automatic, semi-automatic and model-in-the-loop stages).

* ``engine auto INPUT -o OUTDIR``: SA-1B-style JSON per image with the automatic mask
  generator, on Ray (local, or a cluster with ``--ray-address``) or in this process;
* ``engine propose COCO.json -o OUT.json``: automatic masks added as proposals where no
  annotated object is;
* ``engine retrain COCO.json -o OUTDIR``: fine-tune on the accepted annotations and report
  the change on validation images.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

from ..amg_options import AmgOptions
from ..atomic import check_writable
from ..build import registry_config
from ..engine.annotate import OUTPUT_MODE, ModelSpec
from ..engine.auto import FAILURES_FILE, RunSettings, Summary, plan_auto, resolve_ray, run_auto
from ..engine.propose import DEFAULT_MAX_OVERLAP, propose
from ..engine.ray_runner import INSTALL_HINT
from ..engine.retrain import REPORT_FILE, RetrainOptions, format_report, retrain
from ..engine.sources import output_folder, require_inputs
from ..errors import SeganyError
from .common import add_amg_arguments, add_model_arguments, amg_options, inference_options
from .eval import SPLITS, default_split


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``engine`` and its three stages to ``subparsers``."""
    parser = subparsers.add_parser(
        "engine",
        help="data engine: annotate collections automatically, propose masks, retrain",
        description="The SAM data engine for your own images: annotate a collection "
        "automatically (on this machine or a Ray cluster), propose masks where annotations "
        "are missing, and fine-tune the model on the accepted annotations.",
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _add_auto(stages)
    _add_propose(stages)
    _add_retrain(stages)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where it runs")
    group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="a Ray cluster's head (HOST:PORT, ray://HOST:PORT or auto); default: a local "
        "Ray started for the run, or this process when Ray is not installed",
    )
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray workers, each loading the model once (default: one per GPU, else one per "
        "CPU, or per 4 CPUs for SAM's ViT models)",
    )
    group.add_argument("--in-process", action="store_true", help="run in this process, without Ray")
    group.add_argument(
        "--shared-storage",
        action="store_true",
        help="with --ray-address: every node sees the images at the same paths, so workers "
        "read them (default on a cluster: the driver reads each image and ships its bytes)",
    )


def _add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """Where it runs, the generator's options and the model: the stages that segment."""
    _add_run_arguments(parser)
    add_amg_arguments(parser)
    add_model_arguments(parser, precision=True)


def _add_auto(stages: argparse._SubParsersAction) -> None:
    parser = stages.add_parser(
        "auto",
        help="automatic masks for every image of a collection (SA-1B-style JSON per image)",
        description="Run the automatic mask generator over INPUT (a folder, a glob such as "
        "'photos/*.jpg', or a .txt file listing image paths) and write OUTDIR/STEM.json per "
        "image, OUTDIR/summary.json and, for images that could not be read, "
        f"OUTDIR/{FAILURES_FILE}. A rerun does only the unfinished images.",
        epilog="Exit status: 0 on success, 1 if some images failed (they are listed in "
        f"{FAILURES_FILE}), 2 for bad input or options.",
    )
    parser.add_argument("input", metavar="INPUT", help="folder, glob, image or .txt list")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="redo finished images too")
    _add_generator_arguments(parser)
    parser.set_defaults(run=run_auto_command)


def _add_propose(stages: argparse._SubParsersAction) -> None:
    parser = stages.add_parser(
        "propose",
        help="add confident automatic masks where no annotated object is, as proposals",
        description="Annotate the images of a COCO file automatically and write a new COCO "
        "file: the input unchanged plus every automatic mask that covers at most "
        "--max-overlap of its area with existing annotations, in category "
        '\'segany_proposal\' and marked "segany": {"proposal": true, ...}. Accept a '
        'proposal by setting "proposal" to false.',
    )
    parser.add_argument("coco", metavar="COCO.json", help="COCO instances file")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT.json", help="the COCO file to write"
    )
    parser.add_argument(
        "--images",
        metavar="DIR",
        help="folder of the images (default: images/ beside the JSON, or beside it)",
    )
    parser.add_argument(
        "--max-overlap",
        type=float,
        default=DEFAULT_MAX_OVERLAP,
        metavar="X",
        help="largest share of a proposal's area that may lie on existing annotations "
        f"(default: {DEFAULT_MAX_OVERLAP})",
    )
    parser.add_argument(
        "--work",
        metavar="DIR",
        help="where the automatic masks are kept, so reruns need no model work "
        "(default: OUT_auto/ beside the output)",
    )
    _add_generator_arguments(parser)
    parser.set_defaults(run=run_propose_command)


def _add_retrain(stages: argparse._SubParsersAction) -> None:
    parser = stages.add_parser(
        "retrain",
        help="fine-tune on the accepted annotations and report the change",
        description="Fine-tune a model (SAM's interactive recipe, image encoder frozen by "
        "default) on the accepted annotations of a COCO file (unaccepted proposals left "
        "out), evaluate box and click mIoU before and after on validation images, and write "
        f"OUTDIR/model.safetensors and OUTDIR/{REPORT_FILE}.",
    )
    defaults = RetrainOptions()
    parser.add_argument("coco", metavar="COCO.json", help="COCO instances file")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument("--images", metavar="DIR", help="folder of the images (as for propose)")
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help=f"steps (default: {defaults.steps})"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--batch-images", type=int, default=defaults.batch_images, metavar="N")
    parser.add_argument(
        "--masks-per-image", type=int, default=defaults.masks_per_image, metavar="N"
    )
    parser.add_argument(
        "--freeze",
        default=defaults.freeze,
        help="none, encoder (default) or partial (see configs/example.yaml)",
    )
    parser.add_argument(
        "--train-precision",
        dest="precision",
        default=defaults.precision,
        choices=("auto", "fp32", "bf16"),
        help="training number format (default auto: bf16 on CUDA, else fp32)",
    )
    parser.add_argument(
        "--val",
        metavar="PATH",
        help="validation data set (folder or COCO JSON, any format segany eval reads); "
        "default: hold out --val-fraction of the annotated images",
    )
    parser.add_argument("--val-split", choices=SPLITS, help="split of --val (as segany eval)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        metavar="X",
        help=f"share of annotated images held out (default: {defaults.val_fraction})",
    )
    parser.add_argument(
        "--eval-clicks",
        type=int,
        default=defaults.eval_clicks,
        metavar="N",
        help=f"simulated clicks per object in the evaluation (default: {defaults.eval_clicks})",
    )
    parser.add_argument("--max-val-images", type=int, metavar="N", help="evaluate on N images")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="split and training seed")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    add_model_arguments(parser)
    parser.set_defaults(run=run_retrain_command)


# -------------------------------------------------------------------------------------
# Shared checks
# -------------------------------------------------------------------------------------


def _model_spec(
    args: argparse.Namespace,
    options: AmgOptions | None = None,
    inference: dict[str, Any] | None = None,
) -> ModelSpec:
    """The model each worker loads, the generator's options and ``inference`` (precision
    and compile, from :func:`inference_options`); unknown names and missing files fail
    here, at once."""
    if args.model is not None:
        registry_config(args.model)  # an unknown name fails here, naming the known ones
    checkpoint = None
    if args.checkpoint is not None:
        path = Path(args.checkpoint).expanduser()
        if not path.is_file():
            raise SeganyError(f"checkpoint not found: {args.checkpoint}")
        checkpoint = str(path.resolve())  # workers may run in another folder
    return ModelSpec(
        args.model, checkpoint, args.device, options or AmgOptions(), **(inference or {})
    )


def _run_settings(args: argparse.Namespace) -> RunSettings:
    if args.workers is not None and args.workers < 1:
        raise SeganyError(f"--workers must be at least 1, got {args.workers}")
    if args.in_process and (args.ray_address or args.workers or args.shared_storage):
        raise SeganyError(
            "--in-process runs without Ray; leave out --ray-address, --workers and --shared-storage"
        )
    if args.shared_storage and not args.ray_address:
        raise SeganyError("--shared-storage is for clusters; give it with --ray-address")
    return RunSettings(
        use_ray=not args.in_process,
        address=args.ray_address,
        workers=args.workers,
        read_on_workers=True if args.shared_storage else None,
    )


def _ray(settings: RunSettings, command: str) -> ModuleType | None:
    """The ray module for the run, or None (with a note when Ray is missing)."""
    ray = resolve_ray(settings)
    if ray is None and settings.use_ray:
        print(
            f"segany engine {command}: note: Ray is not installed, annotating in this process "
            f"({INSTALL_HINT} for Ray)",
            file=sys.stderr,
        )
    return ray


def _coco_inputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The COCO file and the ``--images`` folder (if given), checked to exist."""
    coco = Path(args.coco)
    if not coco.is_file():
        raise SeganyError(f"COCO file not found: {args.coco}")
    images = Path(args.images) if args.images else None
    if images is not None and not images.is_dir():
        raise SeganyError(f"--images {args.images!r} is not a folder")
    return coco, images


def _print_summary(summary: Summary, outdir: Path) -> None:
    print(summary.line(outdir))
    if summary.failed:
        print(f"failed images and reasons: {outdir / FAILURES_FILE}")


# -------------------------------------------------------------------------------------
# Stages
# -------------------------------------------------------------------------------------


def run_auto_command(args: argparse.Namespace) -> int:
    """``segany engine auto``; exit status 1 when some images failed."""
    options, inference = amg_options(args, OUTPUT_MODE), inference_options(args)
    settings = _run_settings(args)
    spec = _model_spec(args, options, inference)
    outdir = output_folder(args.output)
    jobs = plan_auto(require_inputs(args.input, outdir), outdir)
    ray = _ray(settings, "auto")
    summary = run_auto(jobs, outdir, spec, settings, ray, overwrite=args.overwrite)
    _print_summary(summary, outdir)
    return 1 if summary.failed else 0


def run_propose_command(args: argparse.Namespace) -> int:
    """``segany engine propose``."""
    options, inference = amg_options(args, OUTPUT_MODE), inference_options(args)
    settings = _run_settings(args)
    spec = _model_spec(args, options, inference)
    coco, images = _coco_inputs(args)
    output = Path(args.output)
    if output.is_dir() or output.suffix.lower() != ".json":
        raise SeganyError(f"-o {args.output!r} must be a .json file path")
    check_writable(output, "-o")
    work = output_folder(args.work or output.with_name(f"{output.stem}_auto"), "--work")
    ray = _ray(settings, "propose")
    stats = propose(coco, images, output, work, spec, settings, ray, args.max_overlap)
    assert stats.auto is not None
    print(
        f"{stats.proposals} proposal(s) from {stats.candidates} automatic masks on "
        f"{stats.images_annotated} of {stats.images} image(s) "
        f"({stats.images_missing} not found, {stats.auto.failed} failed); wrote {output}"
    )
    print(f"automatic masks: {work} ({stats.auto.seconds:.1f} s)")
    return 1 if stats.auto.failed else 0


def run_retrain_command(args: argparse.Namespace) -> int:
    """``segany engine retrain``."""
    options = RetrainOptions(**{f.name: getattr(args, f.name) for f in fields(RetrainOptions)})
    options.check()
    _model_spec(args)  # the same model checks as the other stages
    coco, images = _coco_inputs(args)
    val = Path(args.val) if args.val else None
    if val is not None and not val.exists():
        raise SeganyError(f"--val {args.val} not found; give a data folder or COCO JSON")
    val_split = args.val_split or (default_split(val) if val is not None else None)
    outdir = output_folder(args.output)
    report = retrain(
        coco, images, outdir, args.model, args.checkpoint, options, val, val_split, args.resume
    )
    print(format_report(report))
    print(f"model: {report['model']}  report: {outdir / REPORT_FILE}")
    return 0

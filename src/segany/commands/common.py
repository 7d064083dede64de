"""Options and parsing shared by several subcommands."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from ..automatic_mask_generator import SamAutomaticMaskGenerator, check_options
from ..build import MODEL_CONFIGS, load_model, resolve_device
from ..errors import SeganyError
from ..modeling import Sam
from ..precision import PRECISIONS, resolve_precision


def add_model_arguments(
    parser: argparse.ArgumentParser, device: bool = True, precision: bool = False
) -> None:
    """``--model``, ``--checkpoint``, (unless ``device`` is False) ``--device``, and for
    commands that run the model (``precision``) ``--precision`` and ``--compile``; pass
    the latter two on with :func:`inference_options`."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="NAME",
        help=f"registry model: {', '.join(MODEL_CONFIGS)} (default: the bundled 'default'; "
        "Meta's and MobileSAM's official weights are downloaded on first use)",
    )
    group.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights file (.pth, .pt or .safetensors); the model is read from it unless --model",
    )
    if device:
        group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    if precision:
        group.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="number format: fp32 (the official numbers), bf16 (CPUs with AVX512-BF16 or "
            "AMX, recent GPUs), fp16 (CUDA); auto (default) picks bf16 where it is native, "
            "else fp16 on CUDA and fp32 on CPU",
        )
        group.add_argument(
            "--compile",
            action="store_true",
            help="compile the image encoder with torch.compile (slow first image; falls "
            "back to normal mode with a warning where unsupported)",
        )


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


def add_amg_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per option of :class:`SamAutomaticMaskGenerator` (``--points-per-side``, ...),
    with the generator's defaults; read them back with :func:`amg_options`."""
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


def amg_options(args: argparse.Namespace, output_mode: str) -> dict[str, Any]:
    """The generator's keyword arguments from the flags of :func:`add_amg_arguments` and
    :func:`add_model_arguments` (precision, compile); bad options fail here, before any
    model loads."""
    options = {name: getattr(args, name) for name in AMG_OPTIONS}
    options["output_mode"] = output_mode
    check_options(**options)
    return {**options, **inference_options(args)}


def model_from_args(args: argparse.Namespace) -> Sam:
    return load_model(args.model, args.checkpoint, args.device)


def inference_options(args: argparse.Namespace) -> dict[str, Any]:
    """``precision`` and ``compile`` for SamPredictor / SamAutomaticMaskGenerator.

    Checks the precision against the device first, so that a mode the device cannot run
    fails before the model loads.
    """
    resolve_precision(args.precision, resolve_device(args.device))
    return {"precision": args.precision, "compile": args.compile}


def parse_numbers(text: str, option: str, counts: tuple[int, ...], form: str) -> list[float]:
    """Comma-separated numbers for ``option``; SeganyError naming the expected ``form``."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise SeganyError(f"{option} expects {form}, got {text!r}")
    return values

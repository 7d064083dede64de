"""Options and parsing shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from ..amg_options import AMG_OPTIONS, FAMILY_NAMES, AmgOptions, OptionSpec
from ..build import MODEL_NAMES
from ..errors import SeganyError
from ..inference.precision import PRECISIONS, resolve_precision
from ..loading import load_model, model_family, resolve_device
from ..modeling import Sam, Sam2
from ..predictor import SamPredictor
from ..sam2_predictor import Sam2ImagePredictor
from ..zoom_predictor import ZoomPredictor


def add_model_arguments(
    parser: argparse.ArgumentParser,
    device: bool = True,
    precision: bool = False,
    zoom: bool = False,
) -> None:
    """``--model``, ``--checkpoint``, (unless ``device`` is False) ``--device``, for
    commands that run the model (``precision``) ``--precision`` and ``--compile`` (pass
    them on with :func:`inference_options`), and for prompted prediction (``zoom``)
    ``--zoom``, which :func:`image_predictor_from_args` reads."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="NAME",
        help=f"registry model: {', '.join(MODEL_NAMES)} (default: the bundled 'default'; "
        "Meta's SAM and SAM 2 and MobileSAM's official weights are downloaded on first use)",
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
    if zoom:
        group.add_argument(
            "--zoom",
            action="store_true",
            help="segment small objects again on a crop around them (SAM-family models; "
            "one more image embedding per object, sharper masks of small objects)",
        )


def _flag_specs() -> dict[str, tuple[OptionSpec, dict[str, Any]]]:
    """Every generator option a command line can give (``point_grids`` and ``output_mode``
    cannot), over all model families: its spec and its default in each family having it."""
    flags: dict[str, tuple[OptionSpec, dict[str, Any]]] = {}
    for family, options in AMG_OPTIONS.items():
        for spec in options.specs():
            if spec.flag:
                flags.setdefault(spec.name, (spec, {}))[1][family] = spec.default
    return flags


def _defaults_text(defaults: dict[str, Any]) -> str:
    shown = {
        family: f"{value:.4g}" if isinstance(value, float) else str(value)
        for family, value in defaults.items()
    }
    if len(shown) == len(AMG_OPTIONS) and len(set(shown.values())) == 1:
        return f"default: {next(iter(shown.values()))}"
    return "; ".join(f"{FAMILY_NAMES[family]}: {value}" for family, value in shown.items())


def add_amg_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per option of the automatic mask generators (:data:`AMG_OPTIONS`:
    ``--points-per-side``, ...), defaulting to the model family's official default; read
    them back with :func:`amg_options`."""
    group = parser.add_argument_group("mask generator (defaults as the official generators')")
    for name, (spec, defaults) in _flag_specs().items():
        if spec.kind is bool:
            kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": spec.kind, "metavar": "N" if spec.kind is int else "X"}
        only = (
            ""
            if len(defaults) == len(AMG_OPTIONS)
            else f"{FAMILY_NAMES[next(iter(defaults))]} only; "
        )
        group.add_argument(
            "--" + name.replace("_", "-"),
            default=None,
            help=f"{spec.help} ({only}{_defaults_text(defaults)})",
            **kind,
        )


def amg_options(args: argparse.Namespace, output_mode: str) -> AmgOptions:
    """The generator options of the family of the model that ``--model``/``--checkpoint``
    name, from the flags of :func:`add_amg_arguments` (unset flags at that family's
    defaults); bad options fail here, before any model loads."""
    family = model_family(args.model, args.checkpoint)
    options = AMG_OPTIONS[family]
    known = {spec.name for spec in options.specs()}
    given = {name: value for name in _flag_specs() if (value := getattr(args, name)) is not None}
    for name in given:
        if name not in known:
            raise SeganyError(
                f"--{name.replace('_', '-')} is not an option of {FAMILY_NAMES[family]}'s "
                "mask generator"
            )
    return options(**given, output_mode=output_mode)


def model_from_args(args: argparse.Namespace) -> Sam | Sam2:
    return load_model(args.model, args.checkpoint, args.device)


def image_predictor_from_args(
    args: argparse.Namespace, **options: Any
) -> SamPredictor | Sam2ImagePredictor | ZoomPredictor:
    """The model of ``--model``/``--checkpoint`` in its family's predictor (SAM's or SAM
    2's: the same ``set_image``/``predict``), with ``options`` (precision, compile);
    wrapped in a :class:`ZoomPredictor` with ``--zoom``."""
    model = model_from_args(args)
    zoom = getattr(args, "zoom", False)
    if isinstance(model, Sam2):
        if zoom:
            raise SeganyError("--zoom works with SAM-family models; leave it out for SAM 2")
        return Sam2ImagePredictor(model, **options)
    predictor = SamPredictor(model, **options)
    return ZoomPredictor(predictor) if zoom else predictor


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

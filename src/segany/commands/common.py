"""Options and parsing shared by several subcommands."""

from __future__ import annotations

import argparse

from ..build import MODEL_CONFIGS, load_model
from ..errors import SeganyError
from ..modeling import Sam


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--checkpoint`` and ``--device``."""
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
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def model_from_args(args: argparse.Namespace) -> Sam:
    return load_model(args.model, args.checkpoint, args.device)


def parse_numbers(text: str, option: str, counts: tuple[int, ...], form: str) -> list[float]:
    """Comma-separated numbers for ``option``; SeganyError naming the expected ``form``."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise SeganyError(f"{option} expects {form}, got {text!r}")
    return values

"""``segany train``: train or fine-tune from a YAML config (``configs/example.yaml``)."""

from __future__ import annotations

import argparse

from ..errors import SeganyError
from ..train import load_config, train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model from a YAML config",
        description="Train with SAM's simulated interactive recipe. For several GPUs or machines, "
        "launch the same command under torchrun (e.g. torchrun --nproc_per_node 4 -m segany.cli "
        "train CONFIG.yaml).",
    )
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the output folder's checkpoint"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        metavar="M",
        help="stop after about M minutes (one chunk of a longer run), saving where it got to",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise SeganyError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    path = train(
        config, resume=args.resume, progress=not args.no_progress, max_minutes=args.max_minutes
    )
    print(f"model: {path}")
    print(f"metrics: {config.output / 'metrics.jsonl'}  curves: {config.output / 'curves.png'}")
    return 0

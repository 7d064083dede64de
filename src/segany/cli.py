"""The ``segany`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import SeganyError

NEEDS_TORCH = (
    "segany: error: the command line needs PyTorch, which is not installed: "
    "pip install 'segany[torch]' (the 'onnx' extra alone gives segany.OnnxSamPredictor in Python)"
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its error line kept to one line (arguments may hold line breaks);
    subcommands' parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        super().error(one_line(message))


def build_parser() -> argparse.ArgumentParser:
    # Imported here: an ONNX-only install has no torch, and main() says so in one line.
    from .commands import engine, everything, export, segment, serve, track, train, weights
    from .commands import eval as eval_command

    parser = _Parser(
        prog="segany", description="Segment Anything: interactive masks, automatic masks and tools."
    )
    parser.add_argument("--version", action="version", version=f"segany {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (
        segment,
        everything,
        track,
        weights,
        train,
        eval_command,
        export,
        serve,
        engine,
    ):
        command.add_parser(subparsers)
    return parser


def one_line(message: str) -> str:
    """``message`` on one line: line breaks (say, in a file name the user typed) escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"segany: warning: {one_line(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; bad input ends with one line on stderr and exit code 2."""
    try:
        parser = build_parser()
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        print(NEEDS_TORCH, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        return int(args.run(args))
    except SeganyError as error:
        print(f"segany {args.command}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segany {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``segany`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from . import __version__
from .commands import engine, everything, export, segment, serve, train, weights
from .commands import eval as eval_command
from .errors import SeganyError

COMMANDS = (segment, everything, weights, train, eval_command, export, serve, engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segany", description="Segment Anything: interactive masks, automatic masks and tools."
    )
    parser.add_argument("--version", action="version", version=f"segany {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"segany: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; bad input ends with one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        return int(args.run(args))
    except SeganyError as error:
        print(f"segany {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segany {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""One module per ``segany`` subcommand, each with ``add_parser(subparsers)`` and ``run(args)``."""

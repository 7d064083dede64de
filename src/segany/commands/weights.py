"""``segany weights``: list, download and locate official checkpoints."""

from __future__ import annotations

import argparse

from .. import weights as store


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list, download or locate official checkpoints",
        description=f"Official checkpoints, kept in {store.cache_dir()} "
        f"(set ${store.HOME_VARIABLE} to move it).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the checkpoints and whether they are downloaded")
    download = actions.add_parser("download", help="download (resuming) and verify a checkpoint")
    download.add_argument("name", metavar="NAME")
    download.add_argument("--force", action="store_true", help="download again even if present")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    path = actions.add_parser("path", help="print where a checkpoint is (or would be) stored")
    path.add_argument("name", metavar="NAME")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for info in store.WEIGHTS.values():
            state = "downloaded" if store.is_downloaded(info.name) else "not downloaded"
            print(
                f"{info.name:<11} {info.model_type:<6} {info.size_bytes / 1e6:>7.0f} MB  "
                f"{state:<15} {info.description}"
            )
        return 0
    if args.action == "download":
        print(store.download(args.name, force=args.force, progress=not args.quiet))
        return 0
    store.get_info(args.name)  # unknown names are an error here too
    print(store.weights_path(args.name))
    return 0 if store.is_downloaded(args.name) else 1

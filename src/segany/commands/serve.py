"""``segany serve``: the annotation web app over a folder of images."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import check_writable
from ..errors import SeganyError
from ..inference.precision import PRECISIONS, resolve_precision
from ..loading import resolve_device
from .common import add_model_arguments, model_from_args

if TYPE_CHECKING:
    from ..serve import ServeSettings

TOKEN_ENV = "SEGANY_TOKEN"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "serve",
        help="web app to annotate images with clicks, boxes and automatic masks (SAM or SAM 2)",
        description="Serve a web page where you segment the images of IMAGES_DIR (and uploaded "
        "ones) with clicks and boxes, name the objects and export them as COCO JSON or PNG "
        "masks. Everything is saved as you go in the project folder.",
        epilog=f"A token can also come from ${TOKEN_ENV}; then open the printed link "
        "(/?token=...) or send 'Authorization: Bearer TOKEN'.",
    )
    parser.add_argument(
        "images_dir",
        nargs="?",
        metavar="IMAGES_DIR",
        help="folder of images, read recursively (images are never changed); without it, "
        "work with uploaded images",
    )
    parser.add_argument(
        "--project",
        metavar="DIR",
        help="project folder: annotations (project.sqlite), uploads, cached embeddings, "
        "exports (default: IMAGES_DIR/.segany, or ./.segany)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, reachable from this machine only)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--token", help=f"require this token on every API call (or set ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=50.0,
        metavar="MB",
        help="largest upload in MB (default: 50)",
    )
    parser.add_argument(
        "--cache-size",
        type=int,
        default=16,
        metavar="N",
        help="image embeddings kept in memory (default: 16)",
    )
    parser.add_argument(
        "--max-everything-prompts",
        type=int,
        metavar="N",
        help="decoder prompts one 'segment everything' may ask for, points_per_side squared "
        "per crop (default: SAM's 32 points with one crop layer, 5 x 32 x 32)",
    )
    parser.add_argument(
        "--max-queued-jobs",
        type=int,
        metavar="N",
        help="'segment everything' jobs that may wait behind the running one (more get 429; "
        "default: segany.serve.limits.MAX_QUEUED_JOBS)",
    )
    parser.add_argument(
        "--import-coco",
        metavar="FILE",
        help="first add the annotations of this COCO instances JSON to the project (from "
        "segany engine propose: its proposals come in as proposals to keep or delete); "
        "importing a file again adds nothing",
    )
    parser.add_argument(
        "--no-disk-cache",
        action="store_true",
        help="do not keep embeddings in the project folder (they are recomputed after a restart)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the model's number format: fp32 (the official masks), bf16, fp16 (CUDA); auto "
        "(default) picks bf16 where it is native, else fp16 on CUDA and fp32 on CPU",
    )
    parser.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _settings(args: argparse.Namespace) -> ServeSettings:
    from ..serve import ServeSettings

    images_dir = None
    if args.images_dir is not None:
        images_dir = Path(args.images_dir).resolve()
        if not images_dir.is_dir():
            raise SeganyError(f"IMAGES_DIR {args.images_dir!r} is not a folder")
    project = Path(args.project) if args.project else (images_dir or Path.cwd()) / ".segany"
    check_writable(project, "--project", folder=True)  # the server saves everything there
    if not 0 < args.port < 65536:
        raise SeganyError(f"--port must be between 1 and 65535, got {args.port}")
    # NaN passes "<= 0" and inf overflows the byte count: only finite positive sizes.
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        raise SeganyError(
            f"--max-upload-mb must be a positive number of megabytes, got {args.max_upload_mb:g}"
        )
    from ..serve.limits import MAX_EVERYTHING_PROMPTS, MAX_QUEUED_JOBS

    budget = args.max_everything_prompts
    budget = MAX_EVERYTHING_PROMPTS if budget is None else budget
    queue = MAX_QUEUED_JOBS if args.max_queued_jobs is None else args.max_queued_jobs
    for flag, value, least in (
        ("--max-everything-prompts", budget, 1),
        ("--max-queued-jobs", queue, 0),
    ):
        if value < least:
            raise SeganyError(f"{flag} must be at least {least}, got {value}")
    # A mode the device cannot run fails here, before the model loads.
    resolve_precision(args.precision, resolve_device(args.device))
    token = args.token or os.environ.get(TOKEN_ENV) or None
    return ServeSettings(
        images_dir=images_dir,
        project_dir=project.resolve(),
        token=token,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        cache_size=args.cache_size,
        disk_cache=not args.no_disk_cache,
        max_everything_prompts=budget,
        max_queued_jobs=queue,
        precision=args.precision,
        # On loopback only local names are valid Host headers: this stops web pages
        # from reaching the server through DNS rebinding.
        allowed_hosts=("127.0.0.1", "localhost", "[::1]") if is_loopback(args.host) else None,
        model_name=args.model or (Path(args.checkpoint).name if args.checkpoint else "default"),
    )


def check_bind(host: str, port: int) -> None:
    """SeganyError (one line) unless ``host``:``port`` can be listened on.

    Binds and closes a socket as uvicorn will (SO_REUSEADDR set), so that a busy port or
    an unknown host is reported before the model loads rather than by uvicorn after it.
    """
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise SeganyError(
            f"cannot listen on --host {host!r}: the name does not resolve ({reason}); "
            "give an address of this machine such as 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, address = infos[0]
    try:
        with contextlib.closing(socket.socket(family, kind, proto)) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        reason = error.strerror or str(error)
        raise SeganyError(
            f"cannot listen on {_url(host, port, None)}: {reason}; choose another --port "
            "(or --host), or stop the program using it"
        ) from None


def _url(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _import(settings: ServeSettings, coco_path: Path) -> None:
    """Import a COCO file into the project of ``settings`` and print the report."""
    from ..serve.app import PROJECT_FILE
    from ..serve.importer import import_coco
    from ..serve.store import ProjectStore

    database = settings.project_dir / PROJECT_FILE
    new_project = not database.exists()
    try:
        report = import_coco(ProjectStore(database), coco_path, settings.images_dir)
    except SeganyError:
        if new_project:  # a failed first import leaves no empty project database behind
            for suffix in ("", "-wal", "-shm", "-journal"):  # SQLite's files beside it
                database.with_name(database.name + suffix).unlink(missing_ok=True)
        raise
    for line in report.lines():
        print(f"segany serve: {line}" if not line.startswith(" ") else line)


def run(args: argparse.Namespace) -> int:
    """Run ``segany serve`` until interrupted."""
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as error:
        raise SeganyError(
            f"segany serve needs the serve extra ({error.name} is missing): "
            "pip install 'segany[serve]'"
        ) from None
    settings = _settings(args)
    check_bind(args.host, args.port)
    if args.import_coco is not None:  # before the model loads: a bad file fails fast
        _import(settings, Path(args.import_coco))
    if not is_loopback(args.host) and settings.token is None:
        print(
            f"segany serve: warning: listening on {args.host} without a token: anyone who "
            f"can reach it can read and change the annotations; use --token or ${TOKEN_ENV}"
        )
    app = create_app(model_from_args(args), settings)
    print(f"segany serve: open {_url(args.host, args.port, settings.token)}")
    print(f"  images: {settings.images_dir or '(uploads only)'}; project: {settings.project_dir}")
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0

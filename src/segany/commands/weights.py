"""``segany weights``: list, download and locate official checkpoints; convert any
checkpoint to segany safetensors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import weights as store
from ..atomic import check_writable
from ..errors import SeganyError

STORED_DTYPES = ("fp32", "fp16", "bf16")


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
    convert = actions.add_parser(
        "convert",
        help="save any checkpoint as segany safetensors (architecture inside, optionally fp16)",
        description="Read an official .pth, MobileSAM .pt, Hugging Face or segany checkpoint "
        "(or a training checkpoint.pt) and write a .safetensors file that every segany tool "
        "loads without --model. fp16 halves the file; loading casts the weights back.",
    )
    convert.add_argument("checkpoint", metavar="CHECKPOINT")
    convert.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    convert.add_argument("--model", metavar="NAME", help="architecture, when the file lacks it")
    convert.add_argument("--dtype", choices=STORED_DTYPES, default="fp32")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(run=run)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from ..build import CONFIG_METADATA_KEY
    from ..checkpoint import read_metadata
    from ..loading import load_model_and_config, save_model

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise SeganyError(f"{output}: the output must end in .safetensors")
    if output.exists() and not args.overwrite:
        raise SeganyError(f"{output} exists; pass --overwrite to replace it")
    check_writable(output, "-o")
    model, config = load_model_and_config(args.model, args.checkpoint, "cpu")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    # What else the file says of itself (e.g. a training chunk's progress) goes along.
    extra = {
        key: value
        for key, value in read_metadata(args.checkpoint).items()
        if key not in ("format", CONFIG_METADATA_KEY)
    }
    save_model(model, output, config, dtype, metadata=extra)
    print(f"{output} ({output.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        corrupt = []
        name_width = max(len(name) for name in store.WEIGHTS)
        model_width = max(len(info.model_type) for info in store.WEIGHTS.values())
        for info in store.WEIGHTS.values():
            state = store.checkpoint_state(info.name)  # checks the SHA-256 once per file
            if state == "corrupt":
                corrupt.append(info.name)
            print(
                f"{info.name:<{name_width}} {info.model_type:<{model_width}} "
                f"{info.size_bytes / 1e6:>7.0f} MB  {state:<15} {info.description}"
            )
        for name in corrupt:
            print(f"segany weights: {store.corrupt_error(name)}", file=sys.stderr)
        return 0
    if args.action == "download":
        print(store.download(args.name, force=args.force, progress=not args.quiet))
        return 0
    if args.action == "convert":
        return _convert(args)
    store.get_info(args.name)  # unknown names are an error here too
    print(store.weights_path(args.name))
    return 0 if store.is_downloaded(args.name) else 1

"""``segany export``: a model as ONNX graphs for ONNX Runtime and SAM's ONNX front ends."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import check_writable
from ..loading import load_model
from ..onnx.export import DEFAULT_OPSET, check_export_packages, check_opset, export_onnx
from ..onnx.format import SAM2, DecoderOptions
from .common import add_model_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX (encoder.onnx, decoder.onnx, model.json)",
        description="Write DIR/encoder.onnx (image resized to the model's size -> embedding; "
        "for SAM 2 the squashed, normalised 1024 x 1024 model input -> embedding and "
        "high-resolution features), DIR/decoder.onnx (embedding + prompts -> masks, with the "
        "inputs and outputs of the official SAM ONNX export) and DIR/model.json (the model's "
        "family, SAM or SAM 2, and its input conventions). Works for SAM, MobileSAM, segany's "
        "models and SAM 2 (--model sam2.1_t etc., or a SAM 2 --checkpoint). Use them with "
        "segany.onnx.OnnxSamPredictor (pip install 'segany[onnx]', no PyTorch) or "
        "a front end made for SAM's ONNX model.",
        epilog="Exit status: 0 on success, 2 for bad options or a missing package.",
    )
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="uint8 dynamic quantisation of both graphs: about 4x smaller encoder weights, "
        "masks differ slightly",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        metavar="N",
        help=f"ONNX opset, 18 or newer (default {DEFAULT_OPSET})",
    )
    group = parser.add_argument_group(
        "decoder options (as the official export; OnnxSamPredictor needs the defaults)"
    )
    group.add_argument(
        "--return-single-mask",
        action="store_true",
        help="output one mask chosen as the official model does (SAM 2: as SAM 2 "
        "does), not all four",
    )
    group.add_argument(
        "--use-stability-score",
        action="store_true",
        help="score masks by stability instead of the predicted IoU",
    )
    group.add_argument(
        "--return-extra-metrics",
        action="store_true",
        help="also output stability_scores and areas of the full-size masks",
    )
    add_model_arguments(parser, device=False)
    parser.set_defaults(run=run)


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"


def run(args: argparse.Namespace) -> int:
    # Bad options and missing packages fail before the model loads.
    output = check_writable(args.output, "-o", folder=True)
    check_export_packages()
    check_opset(args.opset)
    model = load_model(args.model, args.checkpoint, "cpu")
    result = export_onnx(
        model,
        output,
        opset=args.opset,
        quantize_weights=args.quantize,
        decoder_options=DecoderOptions(
            return_single_mask=args.return_single_mask,
            use_stability_score=args.use_stability_score,
            return_extra_metrics=args.return_extra_metrics,
        ),
        model_name=args.model or (None if args.checkpoint else "default"),
        checkpoint=Path(args.checkpoint).name if args.checkpoint else None,
    )
    what = "uint8 quantised" if args.quantize else "float32"
    family = "SAM 2" if result.info.family == SAM2 else "SAM"
    print(f"exported {what} {family} model, opset {args.opset}, to {result.model_dir}:")
    for path in result.files:
        print(f"  {path.name} ({_size(path.stat().st_size)})")
    for graph, difference in result.max_abs_diff.items():
        print(f"{graph}: max |ONNX Runtime - PyTorch| = {difference:.2g} on a sample input")
    return 0

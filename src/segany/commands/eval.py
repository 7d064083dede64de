"""``segany eval``: mIoU and NoC of a model on a segmentation data set (SAM paper protocol)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..atomic import check_writable
from ..data import FORMATS, load_dataset
from ..data.datasets import split_stems
from ..errors import SeganyError
from ..evaluate import BASELINES, CLICK_COUNTS, PROMPTS, evaluate, plot_click_curve
from .common import add_model_arguments, image_predictor_from_args, inference_options

SPLITS = ("val", "train", "all")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a model on a data set (mIoU after clicks, NoC, box mIoU)",
        description="Prompt every object of a data set with simulated clicks, a point or its "
        "box, as in the SAM paper, and report mIoU (after 1, 2, 3, 5, 9 clicks), NoC@85/90 "
        "and box mIoU.",
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="data folder (or COCO JSON)")
    parser.add_argument(
        "--format", choices=FORMATS, help="annotation format (default: detected from the folder)"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        choices=PROMPTS,
        help="prompt to evaluate; repeat for several (default: clicks)",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        help="images to use, from splits.json (default: val when splits.json lists the "
        "data set, else all)",
    )
    parser.add_argument(
        "--max-clicks",
        type=_positive_int,
        default=20,
        metavar="N",
        help="click budget for --prompt clicks; NoC counts N when never reached (default 20)",
    )
    parser.add_argument("--baseline", choices=BASELINES, help="also score GrabCut on the boxes")
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="use only the first N images"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write mIoU against clicks as a PNG plot"
    )
    add_model_arguments(parser, precision=True, zoom=True)
    parser.set_defaults(run=run)


def default_split(data: Path) -> str:
    """``val`` when a splits.json names this data set, else ``all``."""
    try:
        split_stems(data, "val")
    except SeganyError:
        return "all"
    return "val"


def _check_plot(args: argparse.Namespace, prompts: list[str]) -> Path | None:
    if args.plot is None:
        return None
    path = Path(args.plot)
    if path.suffix.lower() != ".png":
        raise SeganyError(f"--plot must be a .png file, got {args.plot!r}")
    if "clicks" not in prompts:
        raise SeganyError("--plot draws mIoU against clicks; add --prompt clicks")
    return check_writable(path, "--plot")


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a readable table."""
    lines = [
        f"{summary['dataset']} ({summary['format']}, split {summary['split']}): "
        f"{summary['n_images']} images, {summary['n_objects']} objects"
        + (f", {summary['skipped_images']} unreadable" if summary["skipped_images"] else "")
    ]
    if summary["miou_point"] is not None:
        lines.append(
            f"point mIoU     {_number(summary['miou_point'])} "
            f"(oracle {_number(summary['miou_point_oracle'])})"
        )
    if summary["miou_box"] is not None:
        lines.append(f"box mIoU       {_number(summary['miou_box'])}")
    if summary["grabcut_miou_box"] is not None:
        lines.append(f"GrabCut mIoU   {_number(summary['grabcut_miou_box'])}")
    calibration = [
        f"{prompt} {_number(summary[f'score_correlation_{prompt}'], 2)}"
        for prompt in ("point", "box")
        if summary.get(f"score_correlation_{prompt}") is not None
    ]
    if calibration:  # how well the predicted IoU (what the mask generator filters on) tracks IoU
        lines.append("score/IoU corr " + "   ".join(calibration))
    if summary["miou_clicks"] is not None:
        lines.append("clicks         " + "".join(f"{k:>7}" for k in CLICK_COUNTS))
        for label, key in (("top mIoU", "miou_clicks"), ("oracle mIoU", "miou_clicks_oracle")):
            values = summary[key]
            lines.append(
                f"{label:<15}" + "".join(f"{_number(values[str(k)]):>7}" for k in CLICK_COUNTS)
            )
        lines.append(
            f"NoC@85 {_number(summary['noc85'], 2)}   NoC@90 {_number(summary['noc90'], 2)}   "
            f"(at most {summary['max_clicks']} clicks)"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    prompts = args.prompt or ["clicks"]
    plot = _check_plot(args, prompts)
    options = inference_options(args)
    data = Path(args.data)
    if not data.exists():
        raise SeganyError(f"--data {args.data} not found; give the folder with your data set")
    split = args.split or default_split(data)
    dataset = load_dataset(data, format=args.format, split=split)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    predictor = image_predictor_from_args(args, **options)
    result = evaluate(
        predictor, dataset, prompts, max_clicks=args.max_clicks, baseline=args.baseline
    )
    summary = {**result.summary(), "format": dataset.format, "split": split}
    if plot is not None and result.records:
        summary["plot"] = str(plot_click_curve(result, plot))
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(summary))
        if "plot" in summary:
            print(f"plot: {summary['plot']}")
    return 0

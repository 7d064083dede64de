"""``segany segment``: masks for clicks and a box on one image."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..atomic import atomic_paths, check_writable
from ..errors import SeganyError
from ..images import overlay_masks, read_image, write_image, write_mask_png
from ..inputs import check_boxes, check_points
from .common import (
    add_model_arguments,
    image_predictor_from_args,
    inference_options,
    parse_numbers,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment an object from clicks and/or a box",
        description="Segment one object in IMAGE from foreground/background clicks and/or a box. "
        "Coordinates are pixels of IMAGE (x to the right, y down).",
    )
    parser.add_argument("image", metavar="IMAGE", help="JPEG, PNG, TIFF, WebP or BMP file")
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="a click; LABEL 1 = foreground (default), 0 = background; repeat for more",
    )
    parser.add_argument(
        "--box", action="append", default=[], metavar="X0,Y0,X1,Y1", help="box around the object"
    )
    parser.add_argument(
        "--multimask",
        action="store_true",
        help="also write the three candidate masks as MASK-0.png, MASK-1.png, MASK-2.png",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="MASK.png", help="mask to write (0/255 PNG)"
    )
    parser.add_argument(
        "--overlay", metavar="PICTURE.png", help="also write the mask laid over the image"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_arguments(parser, precision=True, zoom=True)
    parser.set_defaults(run=run)


def _parse_prompts(
    args: argparse.Namespace,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    points = [parse_numbers(p, "--point", (2, 3), "X,Y or X,Y,LABEL") for p in args.point]
    if len(args.box) > 1:
        raise SeganyError("give at most one --box")
    box = parse_numbers(args.box[0], "--box", (4,), "X0,Y0,X1,Y1") if args.box else None
    if not points and box is None:
        raise SeganyError("give at least one --point X,Y or a --box X0,Y0,X1,Y1")
    coords = np.array([p[:2] for p in points]) if points else None
    labels = np.array([p[2] if len(p) == 3 else 1.0 for p in points]) if points else None
    return coords, labels, None if box is None else np.array(box)


def _check_output(path: str, option: str) -> Path:
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise SeganyError(f"{option} must be a .png file, got {path!r}")
    return check_writable(target, option)


def _outputs(args: argparse.Namespace) -> tuple[list[Path], Path | None]:
    """(masks, overlay): the best mask, then with --multimask the candidates
    MASK-0.png ... MASK-2.png; all checked writable and distinct before any work."""
    output = _check_output(args.output, "-o")
    masks = [output]
    if args.multimask:
        masks += [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(3)]
    overlay = _check_output(args.overlay, "--overlay") if args.overlay else None
    if overlay is not None and os.path.abspath(overlay) in map(os.path.abspath, masks):
        raise SeganyError(f"--overlay {args.overlay!r} would overwrite a mask; give another name")
    return masks, overlay


def _bbox_xywh(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]


def run(args: argparse.Namespace) -> int:
    coords, labels, box = _parse_prompts(args)
    mask_paths, overlay = _outputs(args)
    image = read_image(args.image)
    # Bad prompts and options fail before the model loads.
    check_points(coords, labels, image.shape[:2])
    check_boxes(box, image.shape[:2])
    options = inference_options(args)
    predictor = image_predictor_from_args(args, **options)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(coords, labels, box, multimask_output=args.multimask)
    masks = np.asarray(masks, bool)  # SAM 2's predictor gives 0/1 floats, as Meta's
    best = int(np.argmax(scores))

    # Best mask first, then the candidates in order.
    chosen = [best, *(range(len(masks)) if args.multimask else [])]
    written = [
        {
            "path": str(path),
            "score": float(scores[i]),
            "area": int(masks[i].sum()),
            "bbox": _bbox_xywh(masks[i]),
        }
        for path, i in zip(mask_paths, chosen, strict=True)
    ]
    # All outputs appear together or not at all (a failing overlay leaves no mask).
    with atomic_paths([*mask_paths, *([overlay] if overlay else [])]) as temps:
        for temp, i in zip(temps, chosen, strict=False):
            write_mask_png(temp, masks[i])
        if overlay is not None:
            picture = overlay_masks(
                image,
                [masks[best]],
                points=coords,
                point_labels=labels,
                boxes=None if box is None else [box],
            )
            write_image(temps[-1], picture)

    if args.json:
        result = {
            "image": args.image,
            "best": written[0],
            "masks": written[1:],
            "overlay": overlay and str(overlay),
        }
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        best_record = written[0]
        print(
            f"mask: {best_record['path']} (score {best_record['score']:.3f}, "
            f"area {best_record['area']} px)"
        )
        for record in written[1:]:
            print(f"candidate: {record['path']} (score {record['score']:.3f})")
        if overlay is not None:
            print(f"overlay: {overlay}")
    return 0

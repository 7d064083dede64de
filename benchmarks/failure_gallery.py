"""A picture of the default model's typical failures, for the model card.

    python benchmarks/failure_gallery.py [--checkpoint FILE] [--limit 30] [-o docs/x.jpg]

For each validation set of ../shared/data it prompts every object of the first ``--limit``
validation images with its box (as ``bench_default_model.py`` does), and draws the object at
the ``--quantile`` of box IoU (0.1 by default: a typical bad case, not the single worst,
which is often an annotation slip): the predicted mask tinted red, the true outline in
green, the prompt box in yellow, cropped around the object and labelled with its IoU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from segany.atomic import atomic_path
from segany.build import load_model
from segany.data import load_dataset
from segany.evaluate import iou, mask_box
from segany.images import write_image
from segany.predictor import SamPredictor
from segany.zoom_predictor import ZoomPredictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("coco-mval", "ccp", "weizmann-horse", "kvasir-seg", "ph2", "dsb2018")
TILE = 256


def scored_objects(
    predictor: SamPredictor | ZoomPredictor, name: str, limit: int
) -> list[tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(IoU, image, true mask, predicted mask, box) of every object of the first images."""
    dataset = load_dataset(SHARED / name, split="val")
    found = []
    for index in range(min(limit, len(dataset))):
        sample = dataset.get(index)
        if sample is None:
            continue
        predictor.set_image(sample.image)
        for truth in sample.masks:
            box = mask_box(truth)
            masks, _, _ = predictor.predict(box=box, multimask_output=False)
            found.append((iou(masks[0], truth, sample.ignore), sample.image, truth, masks[0], box))
    return found


def tile(
    image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, box: np.ndarray, label: str
) -> np.ndarray:
    """The object with its surroundings (twice its box, at least 64 px), TILE x TILE."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(2 * max(x1 - x0, y1 - y0), 64.0)
    height, width = truth.shape
    left = int(np.clip((x0 + x1 - side) / 2, 0, max(width - side, 0)))
    top = int(np.clip((y0 + y1 - side) / 2, 0, max(height - side, 0)))
    right, bottom = min(width, left + int(side)), min(height, top + int(side))
    picture = image.copy()
    red = np.array([230, 40, 40], dtype=np.float32)
    picture[predicted] = (0.5 * picture[predicted] + 0.5 * red).astype(np.uint8)
    contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    picture = picture[top:bottom, left:right].copy()
    scale = TILE / max(picture.shape[:2])
    picture = cv2.resize(
        picture, (round(picture.shape[1] * scale), round(picture.shape[0] * scale))
    )
    shifted = [((c - [left, top]) * scale).astype(np.int32) for c in contours]
    cv2.drawContours(picture, shifted, -1, (40, 220, 40), 1, lineType=cv2.LINE_AA)
    corner = ((np.array([x0 - left, y0 - top, x1 - left, y1 - top])) * scale).round().astype(int)
    cv2.rectangle(picture, tuple(corner[:2]), tuple(corner[2:]), (240, 220, 40), 1)
    canvas = np.full((TILE + 22, TILE, 3), 255, np.uint8)
    canvas[22 : 22 + picture.shape[0], : picture.shape[1]] = picture
    cv2.putText(canvas, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="weights (default: the bundled default model)")
    parser.add_argument("--limit", type=int, default=30, help="validation images per set")
    parser.add_argument("--quantile", type=float, default=0.1, help="which IoU to show")
    parser.add_argument("--zoom", action="store_true", help="predict with ZoomPredictor")
    parser.add_argument("-o", "--output", default="docs/default-model-failures.jpg")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(None if args.checkpoint else "default", args.checkpoint, "cpu").eval()
    predictor: SamPredictor | ZoomPredictor = SamPredictor(model, precision="fp32")
    if args.zoom:
        predictor = ZoomPredictor(predictor)
    tiles = []
    for name in SETS:
        found = sorted(scored_objects(predictor, name, args.limit), key=lambda item: item[0])
        score, image, truth, predicted, box = found[int(args.quantile * (len(found) - 1))]
        median = found[len(found) // 2][0]
        print(f"{name}: {len(found)} objects, shown IoU {score:.2f}, median {median:.2f}")
        tiles.append(tile(image, truth, predicted, box, f"{name}  IoU {score:.2f}"))
    rows = [np.concatenate(tiles[i : i + 3], axis=1) for i in range(0, len(tiles), 3)]
    with atomic_path(Path(args.output)) as temp:
        write_image(temp, np.concatenate(rows, axis=0))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

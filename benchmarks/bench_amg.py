"""Time segany's automatic mask generator against the official one, same weights and image.

Both generators get a model with identical random weights (tests/reference.py) and the same
options; the script checks they return the same number of masks, then prints the time of
each, with and without the image encoder (time spent embedding the image and its crops),
and the ratios official / segany.

Random weights give low, similar predicted IoUs, so by default the quality filters are off
(every mask is upscaled and scored, the worst case for segany's early IoU filter); pass
``--pred-iou-thresh`` / ``--keep-fraction`` to see the effect of filtering.

    .venv/bin/python benchmarks/bench_amg.py --points-per-side 16 --model tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# The official package imports torchvision; tests/standins provides the few names it uses.
sys.path[:0] = [str(ROOT / "tests" / "standins"), str(ROOT / "tests"), str(ROOT / "src")]

from reference import CONFIGS, make_model_pair  # noqa: E402
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator  # noqa: E402

from segany.automatic_mask_generator import SamAutomaticMaskGenerator  # noqa: E402
from segany.images import read_image  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "coco-mval" / "images" / "000000000724.jpg"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(CONFIGS), help="model config")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--min-mask-region-area", type=int, default=0)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-score-thresh", type=float, default=0.0)
    parser.add_argument(
        "--keep-fraction",
        type=float,
        help="use --pred-iou-thresh 0.88 (the default) and shift the random model's predicted "
        "IoUs so that about this fraction of masks passes it",
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="picture to segment")
    parser.add_argument("--repeats", type=int, default=2, help="runs per generator; best kept")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_image(path: Path) -> np.ndarray:
    if path.is_file():
        return read_image(path)
    print(f"{path} not found; using a synthetic 480x640 picture")
    rng = np.random.default_rng(0)
    coarse = rng.random((49, 65, 3))
    return (np.kron(coarse, np.ones((10, 10, 1)))[:480, :640] * 255).astype(np.uint8)


def sharpen(model: torch.nn.Module) -> None:
    """Scale the mask logits so random-weight masks have non-zero stability scores."""
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 30
            mlp.layers[-1].bias *= 30


def predicted_ious(model: torch.nn.Module, image: np.ndarray, points: int) -> torch.Tensor:
    """Predicted IoUs (points², 3) of the full-image masks."""
    generator = SamAutomaticMaskGenerator(model, points_per_side=points, precision="fp32")
    generator.predictor.set_image(image)
    grid = generator.point_grids[0] * np.array(image.shape[1::-1])
    with torch.no_grad():
        return generator._decode(grid, image.shape[:2])[1]


def shift_ious(models: list[torch.nn.Module], shift: float) -> None:
    """Add ``shift`` to every predicted IoU (the IoU head's last bias)."""
    with torch.no_grad():
        for model in models:
            model.mask_decoder.iou_prediction_head.layers[-1].bias += shift


class Stopwatch:
    """Accumulated seconds spent inside calls of ``owner.name`` (wrapped on the instance
    until :meth:`stop`)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.seconds = 0.0
        self._owner, self._name = owner, name
        call = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)

    def stop(self) -> None:
        delattr(self._owner, self._name)


def timed_parts(generator: Any) -> tuple[Stopwatch, Stopwatch]:
    """Stopwatches on the generator's image encoding and mask decoding: segany's
    inference layer, or the official model's two modules."""
    inference = getattr(generator.predictor, "inference", None)
    if inference is not None:
        return Stopwatch(inference, "encode"), Stopwatch(inference, "decode")
    model = generator.predictor.model
    return Stopwatch(model.image_encoder, "forward"), Stopwatch(model.mask_decoder, "forward")


def timed_run(generator: Any, image: np.ndarray) -> dict[str, float]:
    """Seconds for one generate(): total, in the image encoder, in the mask decoder, and
    the rest (prompt grid, upscaling, scores, NMS, RLE); plus the number of masks."""
    encoder, decoder = timed_parts(generator)
    start = time.perf_counter()
    masks = generator.generate(image)
    total = time.perf_counter() - start
    for stopwatch in (encoder, decoder):
        stopwatch.stop()
    rest = total - encoder.seconds - decoder.seconds
    return {"total": total, "encoder": encoder.seconds, "decoder": decoder.seconds,
            "rest": rest, "masks": len(masks)}  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    image = load_image(args.image)
    ours_model, official_model = make_model_pair(args.model, args.seed)
    sharpen(ours_model)
    sharpen(official_model)
    iou_thresh = args.pred_iou_thresh
    if args.keep_fraction is not None:
        # Move the predicted IoUs so the default threshold keeps about that fraction.
        iou_thresh = 0.88
        ious = predicted_ious(ours_model, image, args.points_per_side)
        cut = float(torch.quantile(ious.flatten(), 1 - args.keep_fraction))
        shift_ious([ours_model, official_model], iou_thresh - cut)
    options = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "crop_n_layers": args.crop_n_layers,
        "min_mask_region_area": args.min_mask_region_area,
        "pred_iou_thresh": iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "output_mode": "binary_mask",
    }
    print(f"model {args.model}, image {image.shape[1]}x{image.shape[0]}, {args.threads} thread(s)")
    print("options: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in options.items()))  # fmt: skip

    # Alternate the two so a busy machine slows both alike.
    official = OfficialGenerator(official_model, **options)
    ours = SamAutomaticMaskGenerator(ours_model, precision="fp32", **options)
    runs: dict[str, list[dict[str, float]]] = {"official": [], "segany": []}
    for _ in range(args.repeats):
        runs["official"].append(timed_run(official, image))
        runs["segany"].append(timed_run(ours, image))
    best = {name: min(values, key=lambda r: r["total"]) for name, values in runs.items()}

    columns = ["total", "encoder", "decoder", "rest"]
    print(f"{'seconds':10}" + "".join(f"{c:>10}" for c in columns) + f"{'masks':>8}")
    for name, result in best.items():
        cells = "".join(f"{result[c]:10.3f}" for c in columns)
        print(f"{name:10}{cells}{int(result['masks']):8d}")
    ratio = {c: best["official"][c] / best["segany"][c] for c in columns}
    print(f"{'ratio':10}" + "".join(f"{ratio[c]:9.2f}x" for c in columns))
    if best["official"]["masks"] != best["segany"]["masks"]:
        print("WARNING: the generators returned different numbers of masks")
    without = {name: r["total"] - r["encoder"] for name, r in best.items()}
    print(f"speed-up including the image encoder: {ratio['total']:.2f}x")
    print(f"speed-up excluding the image encoder: {without['official'] / without['segany']:.2f}x")


if __name__ == "__main__":
    main()

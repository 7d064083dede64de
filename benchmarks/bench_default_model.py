"""The bundled default model: latency on this machine and quality against GrabCut.

    python benchmarks/bench_default_model.py [--checkpoint FILE] [--limit N] [--threads 2]

Prints the latency (fp32 and bf16) of the image embedding, of the decoder alone (prompt
encoder + mask decoder, low-res masks) for one prompt set and per set when 16 share a
call (as in the automatic mask generator), and of a whole ``predict`` (three masks at
640x480), then, on the validation stems of ../shared/data/splits.json, box-prompt mIoU
beside OpenCV GrabCut from the same boxes and mIoU after 1 and 5 clicks on coco-mval,
and box mIoU on dsb2018, with the issue's floors.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from segany.build import load_model
from segany.data import load_dataset
from segany.evaluate import evaluate
from segany.precision import Precision
from segany.predictor import SamPredictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLOORS = {
    ("coco-mval", "miou_box"): 0.75,
    ("coco-mval", "miou_1_click"): 0.60,
    ("coco-mval", "miou_5_clicks"): 0.80,
    ("dsb2018", "miou_box"): 0.80,
}


BATCH = 16  # prompt sets per call for the batched decoder timing


def _milliseconds(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def latency(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Milliseconds of each step in each precision, through the predictor's own paths."""
    size = model.image_size
    image = torch.randn(1, 3, size, size)
    points, labels = np.array([[320, 240], [100, 100]]), np.array([1, 0])
    coords = torch.as_tensor(points * (size / 640), dtype=torch.float)[None]
    point_labels = torch.as_tensor(labels, dtype=torch.int)[None]
    batch_coords = coords[:, :1].expand(BATCH, 1, 2) * torch.rand(BATCH, 1, 1) * 2
    batch_labels = point_labels[:, :1].expand(BATCH, 1)
    results = {}
    for name in ("fp32", "bf16"):
        predictor = SamPredictor(model, precision=name)
        predictor.set_image(np.zeros((480, 640, 3), np.uint8))
        precision = predictor.precision

        def encode(precision: Precision = precision) -> object:
            with torch.no_grad():
                return precision.encode(model.image_encoder, image)

        def decode(
            precision: Precision = precision,
            embedding: torch.Tensor = predictor.features,
            points: tuple[torch.Tensor, torch.Tensor] = (coords, point_labels),
        ) -> object:
            # The decoder alone: prompt encoder + mask decoder (low-res masks).
            with torch.no_grad(), precision.decoder():
                sparse, dense = model.prompt_encoder(points, None, None)
                image_pe = model.prompt_encoder.get_dense_pe()
                return precision.decode(
                    model.mask_decoder, embedding, image_pe, sparse, dense, True
                )

        def decode_batch(precision: Precision = precision) -> object:
            # The automatic generator's way: many prompt sets share one embedding.
            return decode(precision, points=(batch_coords, batch_labels))

        def predict(predictor: SamPredictor = predictor) -> object:
            return predictor.predict(points, labels, multimask_output=True)

        results[f"embedding_ms_{name}"] = _milliseconds(encode, repeats)
        results[f"decoder_ms_{name}"] = _milliseconds(decode, repeats)
        results[f"decoder_ms_per_set_of_{BATCH}_{name}"] = (
            _milliseconds(decode_batch, repeats) / BATCH
        )
        results[f"predict_ms_{name}"] = _milliseconds(predict, repeats)
    return results


def quality(model: torch.nn.Module, name: str, limit: int | None) -> dict[str, float | None]:
    dataset = load_dataset(SHARED / name, split="val")
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    # The issue compares with GrabCut on the photos; on micrographs only the box floor counts.
    photos = name == "coco-mval"
    result = evaluate(
        SamPredictor(model, precision="fp32"),
        dataset,
        ("box", "clicks") if photos else ("box",),
        max_clicks=5,
        baseline="grabcut" if photos else None,
        progress=True,
    )
    summary = result.summary()
    clicks = summary.get("miou_clicks") or {}
    return {
        "n_objects": summary["n_objects"],
        "miou_box": summary["miou_box"],
        "grabcut_miou_box": summary.get("grabcut_miou_box"),
        "miou_1_click": clicks.get("1"),
        "miou_5_clicks": clicks.get("5"),
        "miou_box_by_size": by_size(result.records),
    }


# COCO's object-size classes, in pixels of the original image.
SIZES = {
    "small (< 32x32 px)": (0, 32**2),
    "medium": (32**2, 96**2),
    "large (> 96x96 px)": (96**2, None),
}


def by_size(records: list) -> dict[str, dict[str, float | int | None]]:
    """Box mIoU (and GrabCut's, where run) per COCO size class."""
    table = {}
    for name, (low, high) in SIZES.items():
        chosen = [r for r in records if r.area >= low and (high is None or r.area < high)]
        grabcut = [r.iou_grabcut for r in chosen if r.iou_grabcut is not None]
        table[name] = {
            "n": len(chosen),
            "miou_box": float(np.mean([r.iou_box for r in chosen])) if chosen else None,
            "grabcut": float(np.mean(grabcut)) if grabcut else None,
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", help="weights to measure (default: the bundled default model)"
    )
    parser.add_argument("--limit", type=int, help="only the first N validation images of each set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(None if args.checkpoint else "default", args.checkpoint, "cpu").eval()

    report: dict[str, object] = {"latency": latency(model, args.repeats)}
    for key, value in report["latency"].items():
        print(f"{key:<32} {value:8.1f}")
    if not args.skip_quality:
        for name in ("coco-mval", "dsb2018"):
            scores = quality(model, name, args.limit)
            report[name] = scores
            print(f"\n{name} validation ({scores['n_objects']} objects)")
            for key in ("miou_box", "grabcut_miou_box", "miou_1_click", "miou_5_clicks"):
                value = scores[key]
                floor = FLOORS.get((name, key))
                verdict = (
                    ""
                    if floor is None or value is None
                    else ("pass" if value >= floor else "BELOW")
                )
                shown = "-" if value is None else f"{value:.3f}"
                target = "" if floor is None else f"floor {floor:.2f} {verdict}"
                print(f"  {key:<18} {shown:>6}  {target}")
            for size, row in scores["miou_box_by_size"].items():
                box = "-" if row["miou_box"] is None else f"{row['miou_box']:.3f}"
                grabcut = "" if row["grabcut"] is None else f"  GrabCut {row['grabcut']:.3f}"
                print(f"  box mIoU, {size:<18} {box:>6} ({row['n']} objects){grabcut}")
    print("\n" + json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

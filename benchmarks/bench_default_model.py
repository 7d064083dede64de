"""The bundled default model: latency on this machine and quality against GrabCut.

    python benchmarks/bench_default_model.py [--checkpoint FILE] [--limit N] [--threads 2]

Prints the CPU, the latency (fp32 and bf16) of the image embedding (with the decoder's
high-resolution features where the model has them), of the decoder alone (prompt encoder
+ mask decoder, low-res masks) for one prompt set and per set when 16 share a call (as in
the automatic mask generator), and of a whole ``predict`` (three masks at 640x480); then,
on the validation stems of ../shared/data/splits.json of every set, box-prompt mIoU beside
OpenCV GrabCut from the same boxes, mIoU after 1 and 5 clicks on coco-mval, how well the
predicted IoU tracks the actual one, and issue 19's floors. ``--zoom`` scores the same
with small objects segmented again on a crop around them (:class:`segany.ZoomPredictor`).

An AVX2-only CPU (no native bf16) can be approximated on a newer one by restricting
oneDNN's and ATen's kernels:
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_default_model.py``.
GrabCut's scores are cached in ``benchmarks/.cache/`` (keyed by image and object; delete
the folder to recompute them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from segany.build import load_model
from segany.data import load_dataset
from segany.evaluate import evaluate, grabcut, iou, mask_box
from segany.inference.precision import cpu_name
from segany.predictor import SamPredictor
from segany.zoom_predictor import ZoomPredictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(__file__).resolve().parent / ".cache"
# Issue 19's floors on the validation stems (top-scoring mask).
FLOORS = {
    ("coco-mval", "miou_box"): 0.70,
    ("coco-mval", "miou_1_click"): 0.55,
    ("coco-mval", "miou_5_clicks"): 0.75,
    ("dsb2018", "miou_box"): 0.75,
}
# Where box mIoU must also beat GrabCut from the same boxes.
ABOVE_GRABCUT = ("coco-mval", "ccp", "weizmann-horse", "kvasir-seg", "ph2")
SETS = ("coco-mval", "ccp", "weizmann-horse", "kvasir-seg", "ph2", "dsb2018")


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

        def encode(predictor: SamPredictor = predictor) -> object:
            # The predictor's encoder call: with the high-resolution features, if any.
            with torch.no_grad():
                return predictor.inference.encode(image)

        def decode(
            predictor: SamPredictor = predictor,
            points: tuple[torch.Tensor, torch.Tensor] = (coords, point_labels),
        ) -> object:
            # The decoder alone: prompt encoder + mask decoder (low-res masks), as the
            # predictor decodes.
            return predictor.decode_low_res(0, points, multimask_output=True)

        def decode_batch(predictor: SamPredictor = predictor) -> object:
            # The automatic generator's way: many prompt sets share one embedding.
            return decode(predictor, points=(batch_coords, batch_labels))

        def predict(predictor: SamPredictor = predictor) -> object:
            return predictor.predict(points, labels, multimask_output=True)

        results[f"embedding_ms_{name}"] = _milliseconds(encode, repeats)
        results[f"decoder_ms_{name}"] = _milliseconds(decode, repeats)
        results[f"decoder_ms_per_set_of_{BATCH}_{name}"] = (
            _milliseconds(decode_batch, repeats) / BATCH
        )
        results[f"predict_ms_{name}"] = _milliseconds(predict, repeats)
    return results


def grabcut_scores(dataset: torch.utils.data.Dataset, name: str) -> dict[str, float]:
    """GrabCut's IoU from each object's tight box, by "image_id/object index"; cached,
    since GrabCut costs more than the model on these sets and never changes."""
    path = CACHE / f"grabcut-{name}.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    for index in range(len(dataset)):
        sample = dataset.get(index)  # None when unreadable (evaluate skips it too)
        for obj, gt in enumerate([] if sample is None else sample.masks):
            key = f"{sample.image_id}/{obj}"
            if key not in cached:
                cached[key] = iou(grabcut(sample.image, mask_box(gt)), gt, sample.ignore)
    CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(cached))
    return cached


def quality(
    model: torch.nn.Module, name: str, limit: int | None, zoom: bool = False
) -> dict[str, float | None]:
    dataset = load_dataset(SHARED / name, split="val")
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    photos = name == "coco-mval"
    predictor = SamPredictor(model, precision="fp32")
    result = evaluate(
        ZoomPredictor(predictor) if zoom else predictor,
        dataset,
        ("box", "clicks") if photos else ("box", "point"),
        max_clicks=5,
        progress=True,
    )
    baseline = grabcut_scores(dataset, name)
    seen: dict[str, int] = {}
    for record in result.records:  # records come per image, objects in order
        index = seen[record.image_id] = seen.get(record.image_id, -1) + 1
        record.iou_grabcut = baseline[f"{record.image_id}/{index}"]
    summary = result.summary()
    clicks = summary.get("miou_clicks") or {}
    return {
        "n_objects": summary["n_objects"],
        "miou_box": summary["miou_box"],
        "grabcut_miou_box": float(np.mean([r.iou_grabcut for r in result.records])),
        "miou_1_click": clicks.get("1", summary["miou_point"]),
        "miou_5_clicks": clicks.get("5"),
        "score_correlation_box": summary["score_correlation_box"],
        "score_correlation_point": summary["score_correlation_point"],
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


def verdict(name: str, key: str, scores: dict) -> str:
    """The issue's floors that apply to ``scores[key]``, met or not."""
    value, parts = scores[key], []
    floor = FLOORS.get((name, key))
    if floor is not None:
        parts.append(f"floor {floor:.2f} {'pass' if value >= floor else 'BELOW'}")
    if key == "miou_box" and name in ABOVE_GRABCUT:
        above = value > scores["grabcut_miou_box"]
        parts.append(f"above GrabCut {'pass' if above else 'BELOW'}")
    return "  ".join(parts)


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
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument(
        "--zoom",
        action="store_true",
        help="score the predictor with small objects zoomed (segany.ZoomPredictor, "
        "`segany eval --zoom`)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(None if args.checkpoint else "default", args.checkpoint, "cpu").eval()
    isa = {
        k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ
    }
    print(
        f"CPU: {cpu_name()}, {args.threads} threads" + (f"; kernels limited: {isa}" if isa else "")
    )

    report: dict[str, object] = {"cpu": cpu_name(), "isa_limits": isa, "zoom": args.zoom}
    if not args.skip_latency:
        report["latency"] = latency(model, args.repeats)
        for key, value in report["latency"].items():
            print(f"{key:<32} {value:8.1f}")
    if not args.skip_quality:
        for name in args.sets:
            scores = quality(model, name, args.limit, args.zoom)
            report[name] = scores
            zoomed = ", small objects zoomed" if args.zoom else ""
            print(f"\n{name} validation ({scores['n_objects']} objects{zoomed})")
            for key in (
                "miou_box",
                "grabcut_miou_box",
                "miou_1_click",
                "miou_5_clicks",
                "score_correlation_box",
                "score_correlation_point",
            ):
                value = scores[key]
                if value is None:
                    continue
                print(f"  {key:<24} {value:6.3f}  {verdict(name, key, scores)}")
            for size, row in scores["miou_box_by_size"].items():
                box = "-" if row["miou_box"] is None else f"{row['miou_box']:.3f}"
                grabcut = "" if row["grabcut"] is None else f"  GrabCut {row['grabcut']:.3f}"
                print(f"  box mIoU, {size:<18} {box:>6} ({row['n']} objects){grabcut}")
    print("\n" + json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

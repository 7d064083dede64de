"""segany's inference speed against the official segment-anything 1.0, in one run.

Both get the same random weights (tests/reference.py) and the same image. For each part
the script interleaves the implementations (so a busy machine slows them alike), keeps
the best of ``--repeats`` runs and prints seconds, the ratio official / segany, and the
agreement with the official code in float32:

* ``embed``: image embedding of ViT-B (and ViT-H with ``--vit-h``); relative L2 error of
  the embedding;
* ``predict``: one ``predict`` call (two clicks, three masks, full-size masks) on the
  embedded image, the mean of ``--predict-calls`` calls, best of ``--predict-repeats``
  runs; relative L2 error of the low-res logits and mask IoU;
* ``amg``: automatic masks for the image with a 32x32 grid and the generator's default
  options, with and without the image encoder; number of masks and their mean IoU with
  the official masks (matched by prompt point and predicted IoU). Twice: on the main
  model with random weights, then on the bundled default model (its trained prompt
  encoder and mask decoder loaded into the official classes), whose real masks exercise
  the filtering, NMS and encoding of many masks;
* ``memory``: peak resident memory added by one image embedding, each implementation in a
  fresh subprocess (ViT-B, and ViT-H with ``--vit-h``).

Random weights give masks without structure (logits near 0 everywhere), so the model's
hypernetwork outputs are scaled by 1000 (SHARPEN): masks then have large logits and
sharp edges, and IoU against the official masks is meaningful (a flipped pixel is a real
disagreement, not noise around 0). For ``amg`` the predicted IoUs are shifted so that
about ``--keep-fraction`` of the masks pass the default 0.88 threshold, as with real
weights on a photo.

    .venv/bin/python benchmarks/bench_speed.py --repeats 2 --threads 1
    .venv/bin/python benchmarks/bench_speed.py --parts embed,memory --vit-h
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# The official package imports torchvision; tests/standins provides the few names it uses.
sys.path[:0] = [str(ROOT / "tests" / "standins"), str(ROOT / "tests"), str(ROOT / "src")]
sys.path.insert(3, str(ROOT / "benchmarks"))

from bench_amg import predicted_ious, shift_ious, timed_parts  # noqa: E402
from reference import (  # noqa: E402
    CONFIGS,
    build_official,
    default_model_pair,
    make_model_pair,
    randomize_,
)
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator  # noqa: E402
from segment_anything import SamPredictor as OfficialPredictor  # noqa: E402

from segany import SamAutomaticMaskGenerator, SamPredictor  # noqa: E402
from segany.build import build_sam_from_config  # noqa: E402
from segany.images import read_image  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "coco-mval" / "images" / "000000000724.jpg"
PARTS = ("embed", "predict", "amg", "memory")
# Factor on the hypernetworks' outputs: random-weight masks then have sharp edges, and
# most pass the generator's default stability threshold (0.95) on ViT-B.
SHARPEN = 1000.0
OFFICIAL = "official fp32"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--precisions", default="fp32,bf16", help="segany modes to time")
    parser.add_argument("--compile", action="store_true", help="also time segany with compile")
    parser.add_argument("--model", default="vit_b", choices=sorted(CONFIGS), help="main model")
    parser.add_argument("--vit-h", action="store_true", help="also embed (and measure) ViT-H")
    parser.add_argument("--repeats", type=int, default=2, help="runs per implementation")
    parser.add_argument("--predict-calls", type=int, default=10, help="predict calls per run")
    # predict runs take a second: more of them make its best-of far steadier on a busy CPU.
    parser.add_argument("--predict-repeats", type=int, default=10, help="runs of predict")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--keep-fraction", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "MODEL", "PRECISION"),
                        help=argparse.SUPPRESS)  # fmt: skip
    return parser.parse_args(argv)


# -------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------


@dataclass
class Row:
    """One implementation's result in a table."""

    name: str
    seconds: float
    cells: dict[str, str]


def best_of(
    repeats: int,
    runs: dict[str, Callable[[], Any]],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Best seconds of each callable over ``repeats`` interleaved rounds, by ``clock``
    (``time.process_time``: the CPU time, which on one thread leaves out the waits for
    other processes on a busy machine)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = clock()
            run()
            best[name] = min(best[name], clock() - start)
    return best


def sharpen(model: torch.nn.Module) -> None:
    """Scale the mask logits by SHARPEN (the last layer of each hypernetwork MLP)."""
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= SHARPEN
            mlp.layers[-1].bias *= SHARPEN


def relative_error(ours: Any, reference: Any) -> float:
    ours, reference = torch.as_tensor(ours).double(), torch.as_tensor(reference).double()
    return float((ours - reference).norm() / reference.norm())


def mask_iou(a: Any, b: Any) -> float:
    """IoU of two masks (bool, or 0/1 numbers: non-zero is inside)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def print_table(title: str, rows: list[Row], columns: list[str]) -> None:
    official = next(row.seconds for row in rows if row.name == OFFICIAL)
    print(f"\n{title}")
    print(f"{'':16}{'seconds':>10}{'speed-up':>10}" + "".join(f"{c:>16}" for c in columns))
    for row in rows:
        ratio = f"{official / row.seconds:9.2f}x"
        cells = "".join(f"{row.cells.get(c, ''):>16}" for c in columns)
        print(f"{row.name:16}{row.seconds:10.4g}{ratio:>10}{cells}")


def modes(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(label, precision, compile) of each segany configuration to time."""
    found = [(f"segany {p}", p, False) for p in args.precisions.split(",")]
    if args.compile:
        found += [(f"segany {p} comp", p, True) for p in args.precisions.split(",")]
    return found


# -------------------------------------------------------------------------------------
# Parts
# -------------------------------------------------------------------------------------


def bench_embed(
    name: str, args: argparse.Namespace, image: np.ndarray
) -> tuple[dict[str, SamPredictor], OfficialPredictor]:
    """Times set_image; returns the predictors, their image set, for ``predict``."""
    ours_model, official_model = make_model_pair(name, args.seed)
    for model in (ours_model, official_model):
        sharpen(model)
    official = OfficialPredictor(official_model)
    ours = {label: SamPredictor(ours_model, p, compile=c) for label, p, c in modes(args)}
    for label, predictor in ours.items():
        if label.endswith("comp"):  # the first call compiles; keep it out of the timing
            predictor.set_image(image)
    runs = {OFFICIAL: lambda: official.set_image(image)}
    runs |= {label: (lambda p=p: p.set_image(image)) for label, p in ours.items()}
    best = best_of(args.repeats, runs)
    reference = official.get_image_embedding()
    rows = [Row(OFFICIAL, best[OFFICIAL], {"rel. error": "0"})]
    for label, predictor in ours.items():
        error = relative_error(predictor.get_image_embedding(), reference)
        rows.append(Row(label, best[label], {"rel. error": f"{error:.2e}"}))
    print_table(f"image embedding, {name} (1024x1024 input)", rows, ["rel. error"])
    return ours, official


def bench_predict(
    ours: dict[str, SamPredictor], official: OfficialPredictor, args: argparse.Namespace
) -> None:
    height, width = official.original_size
    prompt = {
        "point_coords": np.array([[0.45 * width, 0.55 * height], [0.8 * width, 0.2 * height]]),
        "point_labels": np.array([1, 0]),
        "multimask_output": True,
    }

    def calls(predictor: Any) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.predict_calls):
                predictor.predict(**prompt)

        return run

    runs = {OFFICIAL: calls(official)} | {label: calls(p) for label, p in ours.items()}
    best = best_of(args.predict_repeats, runs)
    ref_masks, _, ref_low = official.predict(**prompt)
    rows = [Row(OFFICIAL, best[OFFICIAL] / args.predict_calls, {})]
    for label, predictor in ours.items():
        masks, _, low = predictor.predict(**prompt)
        iou = min(mask_iou(m, r) for m, r in zip(masks, ref_masks, strict=True))
        cells = {"logit error": f"{relative_error(low, ref_low):.2e}", "mask IoU": f"{iou:.4f}"}
        rows.append(Row(label, best[label] / args.predict_calls, cells))
    title = (
        f"predict: 2 clicks, 3 masks at {width}x{height} (mean of {args.predict_calls} calls, "
        f"best of {args.predict_repeats} runs)"
    )
    print_table(title, rows, ["logit error", "mask IoU"])


def bench_amg(args: argparse.Namespace, image: np.ndarray) -> None:
    """The automatic generators on the main model with random weights (SAM's decoder size;
    masks without structure, so few survive), then on the bundled default model, whose
    trained weights give real masks (a 32 x 32 embedding: a 4x smaller decoder input)."""
    ours_model, official_model = make_model_pair(args.model, args.seed)
    for model in (ours_model, official_model):
        sharpen(model)
    # Predicted IoUs of random weights are low; shift them so the default 0.88 threshold
    # keeps about --keep-fraction of the masks.
    ious = predicted_ious(ours_model, image, args.points_per_side)
    shift_ious(
        [ours_model, official_model], 0.88 - float(torch.quantile(ious, 1 - args.keep_fraction))
    )
    time_generators(f"{args.model}, random weights", ours_model, official_model, args, image)
    # The small default model's predicted IoUs and stability scores are mostly under the
    # defaults' thresholds (made for SAM's); with the filters off, hundreds of masks
    # go through NMS and encoding.
    no_filters = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    time_generators(
        "default model, trained weights, no quality filters",
        *default_model_pair(),
        args,
        image,
        no_filters,
    )


def time_generators(
    model_label: str,
    ours_model: torch.nn.Module,
    official_model: torch.nn.Module,
    args: argparse.Namespace,
    image: np.ndarray,
    options: dict[str, Any] | None = None,
) -> None:
    """Times and compares the official and segany generators on one pair of models, with
    the generators' default ``options`` updated by those given."""
    options = {"points_per_side": args.points_per_side, **(options or {})}
    generators: dict[str, Any] = {OFFICIAL: OfficialGenerator(official_model, **options)}
    for label, precision, compiled in modes(args):
        generators[label] = SamAutomaticMaskGenerator(
            ours_model, precision=precision, compile=compiled, **options
        )
        if compiled:
            generators[label].generate(image)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in generators}
    records: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for name, generator in generators.items():
            encoder, decoder = timed_parts(generator)
            start = time.perf_counter()
            records[name] = generator.generate(image)
            total = time.perf_counter() - start
            encoder.stop()
            decoder.stop()
            times[name].append((total, total - encoder.seconds))
    reference = records[OFFICIAL]
    rows = []
    for name, runs in times.items():
        total, without = min(runs, key=lambda r: r[1])
        cells = {"masks": str(len(records[name])), "with encoder": f"{total:.3f}"}
        if name != OFFICIAL:
            cells["mean IoU"] = f"{matched_iou(records[name], reference):.4f}"
        rows.append(Row(name, without, cells))
    official_total = min(t for t, _ in times[OFFICIAL])
    for row in rows:
        row.cells["speed-up w/ enc"] = f"{official_total / float(row.cells['with encoder']):.2f}x"
    title = (
        f"automatic masks, {model_label}, {args.points_per_side}x{args.points_per_side} grid, "
        f"{image.shape[1]}x{image.shape[0]} image; seconds exclude the image encoder"
    )
    print_table(title, rows, ["masks", "mean IoU", "with encoder", "speed-up w/ enc"])


def matched_iou(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> float:
    """Mean mask IoU of each official record with segany's record from the same prompt
    point and the closest predicted IoU; a missing match counts as IoU 0."""
    by_point: dict[tuple[float, ...], list[dict[str, Any]]] = {}
    for record in records:
        by_point.setdefault(tuple(record["point_coords"][0]), []).append(record)
    ious = []
    for ref in reference:
        candidates = by_point.get(tuple(ref["point_coords"][0]), [])
        if not candidates:
            ious.append(0.0)
            continue
        match = min(candidates, key=lambda r: abs(r["predicted_iou"] - ref["predicted_iou"]))
        ious.append(mask_iou(match["segmentation"], ref["segmentation"]))
    return float(np.mean(ious)) if ious else 1.0


# -------------------------------------------------------------------------------------
# Memory, one subprocess per measurement
# -------------------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(impl: str, name: str, precision: str) -> None:
    """Print the peak resident bytes one embedding adds (Linux: VmHWM after a reset)."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    if impl == "official":
        model = build_official(config)
        embed = model.image_encoder
    else:
        model = randomize_(build_sam_from_config(config), 0)
        predictor = SamPredictor(model, precision=precision)
        embed = predictor.inference.encode
    image = torch.randn(1, 3, config.img_size, config.img_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
    before = _rss_bytes("VmRSS")
    with torch.no_grad():
        embed(image)
    print(json.dumps({"peak_bytes": _rss_bytes("VmHWM") - before}))


def bench_memory(args: argparse.Namespace) -> None:
    for name in _models(args):
        runs = [("official", "fp32"), *(("segany", p) for p in args.precisions.split(","))]
        peaks = {}
        for impl, precision in runs:
            command = [sys.executable, __file__, "--memory-child", impl, name, precision]
            command += ["--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            peaks[f"{impl} {precision}"] = json.loads(output.splitlines()[-1])["peak_bytes"]
        print(f"\npeak memory added by one image embedding, {name} (fresh process each)")
        official = peaks[OFFICIAL]
        for label, peak in peaks.items():
            print(f"{label:16}{peak / 2**20:10.0f} MB{peak / official:10.2f}x of official")


# -------------------------------------------------------------------------------------


def _models(args: argparse.Namespace) -> list[str]:
    return [args.model, "vit_h"] if args.vit_h and args.model != "vit_h" else [args.model]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    image = read_image(args.image)
    print(
        f"{args.threads} thread(s), best of {args.repeats}, image {args.image.name} "
        f"{image.shape[1]}x{image.shape[0]}, torch {torch.__version__}"
    )
    if "embed" in parts or "predict" in parts:
        for name in _models(args):
            ours, official = bench_embed(name, args, image)
            if "predict" in parts and name == args.model:
                bench_predict(ours, official, args)
    if "amg" in parts:
        bench_amg(args, image)
    if "memory" in parts:
        bench_memory(args)


if __name__ == "__main__":
    main()

"""segany's SAM 2 speed against Meta's ``sam2`` 1.1.0, in one run, on the same weights.

Both libraries get the same random weights (Meta's model built from its sam2.1 config
with ``build_sam2_video_predictor(config, ckpt_path=None, device="cpu")``, randomised as
the tests do, mask logits sharpened and objects judged present, then copied into segany's
``Sam2`` with ``load_official_state_dict``) and the same image and frames. Meta's code
runs in float32 on a CPU (neither of its predictors uses autocast there; it stores its
video memories in bfloat16). For each part the implementations are interleaved (a busy
machine slows them alike), the best of ``--repeats`` runs is kept, and the table gives
seconds, the ratio official / segany and the agreement with Meta's float32 results:

* ``embed``: ``set_image`` of a 1024-wide photo-like image; relative L2 error of the
  image embedding;
* ``predict``: one ``predict`` (one click, three masks at the image's size) on the set
  image, mean of ``--predict-calls`` calls; the smallest mask IoU of the three;
* ``video``: two objects clicked on frame 0 of a ``--frames``-frame video, then
  ``propagate_in_video`` through it (frames encoded on the way, as both predictors do);
  seconds for prompts and propagation, frames per second, and the smallest mask IoU of
  any object on any frame. Hole filling is off in both (Meta's needs its CUDA extension
  and skips it on a CPU);
* ``memory`` (``--memory-frames N``): the peak resident memory (VmHWM) of a fresh
  process per library that reads an N-frame video and tracks one object through it; with
  ``--memory-tracked M``, through its first M frames only, the peak then extrapolated to
  all N by the growth of the inference state per frame (what each frame's outputs add:
  both libraries hold every frame from the start, so the rest of the peak is the same).

    .venv/bin/python benchmarks/bench_sam2.py --quick
    .venv/bin/python benchmarks/bench_sam2.py --models hiera_tiny,hiera_base_plus --repeats 3
    .venv/bin/python benchmarks/bench_sam2.py --skip-video --precision fp32 --memory-frames 0
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/bench_sam2.py

(The last imitates an AVX2-only CPU: no bfloat16 or AVX-512 kernels.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Meta's package imports torchvision; tests/standins provides the few names it uses.
sys.path[:0] = [str(ROOT / "tests" / "standins"), str(ROOT / "tests"), str(ROOT / "src")]
sys.path.insert(3, str(ROOT / "benchmarks"))

from bench_speed import best_of, mask_iou, relative_error  # noqa: E402
from reference import randomize_  # noqa: E402
from sam2.build_sam import build_sam2_video_predictor  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

from segany import Sam2ImagePredictor, Sam2VideoPredictor  # noqa: E402
from segany.inference.precision import cpu_name  # noqa: E402
from segany.modeling.sam2 import SAM2_CONFIGS, Sam2  # noqa: E402

CONFIG_NAMES = {"hiera_tiny": "sam2.1_hiera_t", "hiera_base_plus": "sam2.1_hiera_b+"}
OFFICIAL = "official fp32"
# Random weights give mask logits within +-1; scaled, masks have edges (as in the tests).
LOGIT_SCALE = 15.0
# The object-score head's bias: objects judged present, so every frame has a mask.
PRESENT_BIAS = 10.0
IMAGE_SIZE = (683, 1024)  # (H, W) of the image and the video's frames
CLICKS = ((0.3, 0.55), (0.7, 0.35))  # two objects' clicks, fractions of (W, H)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="hiera_tiny,hiera_base_plus",
                        help=f"comma list of {sorted(CONFIG_NAMES)}")  # fmt: skip
    parser.add_argument("--precision", default="fp32,bf16",
                        help="segany modes to time (auto: bf16 where native)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs per implementation")
    parser.add_argument("--predict-calls", type=int, default=10)
    parser.add_argument("--frames", type=int, default=8, help="frames of the timed video")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--skip-image", action="store_true", help="no embed/predict tables")
    parser.add_argument("--memory-frames", type=int, default=200,
                        help="frames of the peak-memory run (0: skip it)")  # fmt: skip
    parser.add_argument("--memory-tracked", type=int, default=None,
                        help="of those, frames tracked (default: all); the peak is "
                             "extrapolated to all by the state's growth per frame")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="hiera_tiny, 2 repeats, 4 frames, no memory run")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by CPU time, not the wall clock (fair on a busy machine "
                             "with --threads 1)")  # fmt: skip
    parser.add_argument("--memory-child", nargs=5,
                        metavar=("IMPL", "MODEL", "PRECISION", "DIR", "TRACKED"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.frames, args.memory_frames = "hiera_tiny", 2, 4, 0
    return args


# -- models and data ---------------------------------------------------------------------


def model_pair(model: str) -> tuple[Any, Sam2]:
    """Meta's video predictor (a SAM2Base: its image predictor takes it too) with random
    weights, and segany's model with the same weights."""
    name = CONFIG_NAMES[model]
    torch.manual_seed(0)
    meta = build_sam2_video_predictor(f"configs/sam2.1/{name}.yaml", ckpt_path=None, device="cpu")
    randomize_(meta, seed=0)
    with torch.no_grad():
        for mlp in meta.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(LOGIT_SCALE)
        meta.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(PRESENT_BIAS)
    meta.fill_hole_area = 0
    ours = Sam2.from_config(SAM2_CONFIGS[name]).eval()
    ours.load_official_state_dict(meta.state_dict())
    return meta.eval(), ours


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """(H, W, 3) uint8 frames: discs moving over a blocky background, with noise."""
    rng = np.random.default_rng(seed)
    height, width = IMAGE_SIZE
    ys, xs = np.mgrid[:height, :width]
    blocks = rng.uniform(0, 255, (height // 32 + 1, width // 32 + 1, 3))
    background = np.kron(blocks, np.ones((32, 32, 1)))[:height, :width]
    discs = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(60, 200),
              rng.uniform(0, 255, 3), rng.uniform(-8, 8, 2)) for _ in range(6)]  # fmt: skip
    out = []
    for i in range(count):
        frame = background.copy()
        for x, y, r, colour, (dx, dy) in discs:
            frame[(xs - x - dx * i) ** 2 + (ys - y - dy * i) ** 2 < r**2] = colour
        frame += rng.normal(0, 6, frame.shape)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


def write_video(folder: Path, count: int) -> Path:
    for i, frame in enumerate(frames(count)):
        Image.fromarray(frame).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


# -- helpers -----------------------------------------------------------------------------


def print_table(title: str, rows: list[tuple[str, float, dict[str, str]]]) -> None:
    columns = list(dict.fromkeys(c for _, _, cells in rows for c in cells))
    official = rows[0][1]
    print(f"\n{title}")
    print(f"{'':16}{'seconds':>10}{'speed-up':>10}" + "".join(f"{c:>14}" for c in columns))
    for name, seconds, cells in rows:
        ratio = f"{official / seconds:9.2f}x"
        print(f"{name:16}{seconds:10.4g}{ratio:>10}" + "".join(
            f"{cells.get(c, ''):>14}" for c in columns))  # fmt: skip


# -- parts -------------------------------------------------------------------------------


def bench_image(model: str, meta: Any, ours: Sam2, args: argparse.Namespace) -> None:
    image = frames(1)[0]
    official = SAM2ImagePredictor(meta)
    segany = {f"segany {p}": Sam2ImagePredictor(ours, precision=p) for p in _modes(args)}
    runs = {OFFICIAL: lambda: official.set_image(image)}
    runs |= {label: (lambda p=p: p.set_image(image)) for label, p in segany.items()}
    best = best_of(args.repeats, runs, clock(args))
    reference = official.get_image_embedding()
    rows = [(OFFICIAL, best[OFFICIAL], {"rel. error": "0"})]
    for label, predictor in segany.items():
        error = relative_error(predictor.get_image_embedding(), reference)
        rows.append((label, best[label], {"rel. error": f"{error:.2e}"}))
    print_table(f"image embedding, {model} ({image.shape[1]}x{image.shape[0]} image)", rows)

    height, width = image.shape[:2]
    prompt = {"point_coords": np.array([[CLICKS[0][0] * width, CLICKS[0][1] * height]]),
              "point_labels": np.array([1]), "multimask_output": True}  # fmt: skip

    def calls(predictor: Any) -> Callable[[], None]:
        return lambda: [predictor.predict(**prompt) for _ in range(args.predict_calls)]

    runs = {OFFICIAL: calls(official)} | {label: calls(p) for label, p in segany.items()}
    best = best_of(3 * args.repeats, runs, clock(args))
    expected = official.predict(**prompt)[0]
    rows = [(OFFICIAL, best[OFFICIAL] / args.predict_calls, {})]
    for label, predictor in segany.items():
        masks = predictor.predict(**prompt)[0]
        iou = min(mask_iou(m, e) for m, e in zip(masks, expected, strict=True))
        rows.append((label, best[label] / args.predict_calls, {"mask IoU": f"{iou:.4f}"}))
    print_table(f"predict, {model}: one click, 3 masks (mean of {args.predict_calls})", rows)


def track(predictor: Any, state: dict[str, Any]) -> list[np.ndarray]:
    """Click two objects on frame 0 and propagate; each frame's (objects, H, W) masks."""
    predictor.reset_state(state)
    height, width = state["video_height"], state["video_width"]
    for obj_id, (x, y) in enumerate(CLICKS, start=1):
        predictor.add_new_points_or_box(
            state, 0, obj_id, points=np.array([[x * width, y * height]], np.float32),
            labels=np.array([1], np.int32))  # fmt: skip
    return [(m[:, 0] > 0).numpy() for _, _, m in predictor.propagate_in_video(state)]


def bench_video(model: str, meta: Any, ours: Sam2, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        video = write_video(Path(folder), args.frames)
        predictors = {OFFICIAL: meta}
        predictors |= {
            f"segany {p}": Sam2VideoPredictor(ours, fill_hole_area=0, precision=p)
            for p in _modes(args)
        }
        with torch.inference_mode():
            states = {label: p.init_state(str(video)) for label, p in predictors.items()}
        results: dict[str, list[np.ndarray]] = {}

        def run(label: str) -> Callable[[], None]:
            def go() -> None:
                results[label] = track(predictors[label], states[label])

            return go

        best = best_of(args.repeats, {label: run(label) for label in predictors}, clock(args))
    expected = results[OFFICIAL]
    rows = []
    for label, seconds in best.items():
        cells = {"frames/s": f"{args.frames / seconds:.3f}"}
        if label != OFFICIAL:
            iou = min(mask_iou(m, e) for got, want in zip(results[label], expected, strict=True)
                      for m, e in zip(got, want, strict=True))  # fmt: skip
            cells["mask IoU"] = f"{iou:.4f}"
        rows.append((label, seconds, cells))
    print_table(f"video, {model}: 2 objects clicked, {args.frames} frames propagated", rows)


# -- peak memory, a fresh process per library ----------------------------------------------


def memory_child(impl: str, model: str, precision: str, folder: str, tracked: str) -> None:
    """Track one object through ``tracked`` frames of the video in ``folder`` (all when 0);
    print the process's peak RSS and how many bytes the inference state grew per frame."""
    meta, ours = model_pair(model)
    predictor: Any = meta
    if impl == "segany":
        del meta
        predictor = Sam2VideoPredictor(ours, fill_hole_area=0, precision=precision)
    else:
        del ours
    with torch.inference_mode():
        state = predictor.init_state(folder)
        width, height = state["video_width"], state["video_height"]
        predictor.add_new_points_or_box(
            state, 0, 1, points=np.array([[CLICKS[0][0] * width, CLICKS[0][1] * height]]),
            labels=np.array([1], np.int32))  # fmt: skip
        frames = int(tracked) or None
        before, count = state_bytes(state), 0
        for _ in predictor.propagate_in_video(state, max_frame_num_to_track=frames):
            count += 1
        growth = (state_bytes(state) - before) / max(count - 1, 1)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_bytes": peak, "bytes_per_frame": growth, "frames": count}))


def state_bytes(state: Any) -> int:
    """Bytes of the distinct tensor storages an inference state holds (nested)."""
    storages: dict[int, int] = {}
    pending = [state]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return sum(storages.values())


def bench_memory(model: str, args: argparse.Namespace) -> None:
    total = args.memory_frames
    tracked = min(args.memory_tracked or total, total)
    with tempfile.TemporaryDirectory() as folder:
        write_video(Path(folder), total)
        results = {}
        for impl, precision in [("official", "fp32"), *(("segany", p) for p in _modes(args))]:
            command = [sys.executable, __file__, "--threads", str(args.threads), "--memory-child",
                       impl, model, precision, folder, str(tracked)]  # fmt: skip
            start = time.perf_counter()
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.splitlines()[-1])
            result["seconds"] = time.perf_counter() - start
            # The state grows by the same stored outputs each frame: the frames not
            # tracked would have added that much to the peak.
            untracked = (total - tracked) * result["bytes_per_frame"]
            result["peak_all"] = result["peak_bytes"] + untracked
            results[f"{impl} {precision}"] = result
    shown = f"{total} frames" if tracked == total else f"{total} frames ({tracked} tracked)"
    print(f"\npeak resident memory, {model}: one object through {shown}, a fresh process each")
    official = results[OFFICIAL]["peak_all"]
    for label, result in results.items():
        peak = result["peak_all"]
        print(
            f"{label:16}{peak / 2**20:10.0f} MB{peak / official:8.2f}x of official"
            f"   (measured {result['peak_bytes'] / 2**20:.0f} MB; state "
            f"+{result['bytes_per_frame'] / 2**20:.2f} MB a frame; {result['seconds']:.0f} s)"
        )


def clock(args: argparse.Namespace) -> Callable[[], float]:
    return time.process_time if args.cpu_time else time.perf_counter


def _modes(args: argparse.Namespace) -> list[str]:
    return args.precision.split(",")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[0]
    timed = "CPU time" if args.cpu_time else "wall clock"
    print(f"CPU: {cpu_name()}; {args.threads} thread(s); load average {load} at start; "
          f"best of {args.repeats} by the {timed}; torch {torch.__version__}")  # fmt: skip
    for model in args.models.split(","):
        meta, ours = model_pair(model)
        if not args.skip_image:
            bench_image(model, meta, ours, args)
        if not args.skip_video:
            bench_video(model, meta, ours, args)
        if args.memory_frames:
            bench_memory(model, args)


if __name__ == "__main__":
    main()

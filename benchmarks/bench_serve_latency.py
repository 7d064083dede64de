"""Click latency of ``segany serve``, alone and while a "segment everything" job runs.

    .venv/bin/python benchmarks/bench_serve_latency.py [--model default] [--clicks 40]

Builds the app in this process (FastAPI's TestClient: no network, the server's own
handling included) over one picture, embeds it, and times ``POST /predict`` clicks at
random points: first with nothing else running, then while a long job (by default 64
points per side, the most one request may ask for without crops) runs in the server's
worker thread. Prints p50 / p95 / max of each and how far the job got meanwhile; numbers
only, nothing is asserted.

A click waits for at most the job's current step (one decoder batch, or one crop's
encoder pass), so the gap between the two rows is about one batch's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "standins"), str(ROOT / "tests"), str(ROOT / "src")]

from reference import CONFIGS, randomize_  # noqa: E402

from segany.build import build_sam, build_sam_from_config  # noqa: E402
from segany.images import read_image  # noqa: E402
from segany.serve import ServeSettings, create_app  # noqa: E402
from segany.serve.limits import MAX_POINTS_PER_SIDE  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "coco-mval" / "images" / "000000000724.jpg"
FINAL = ("done", "failed", "cancelled")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="default",
        choices=sorted(CONFIGS),
        help="'default': the bundled trained model; others get random weights",
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="picture to click on")
    parser.add_argument("--clicks", type=int, default=40, help="timed clicks per row")
    parser.add_argument("--points-per-side", type=int, default=MAX_POINTS_PER_SIDE)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument(
        "--relaxed",
        action="store_true",
        help="quality filters off (every mask upscaled: the slowest batches)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def picture(path: Path) -> np.ndarray:
    if path.is_file():
        return read_image(path)
    print(f"{path} not found; using a synthetic 480x640 picture")
    coarse = np.random.default_rng(0).random((49, 65, 3))
    return (np.kron(coarse, np.ones((10, 10, 1)))[:480, :640] * 255).astype(np.uint8)


def model_for(name: str) -> torch.nn.Module:
    if name == "default":
        return build_sam("default").eval()
    return randomize_(build_sam_from_config(CONFIGS[name]), 0).eval()


def click_ms(client: TestClient, rng: np.random.Generator, size: tuple[int, int]) -> float:
    """One click at a random pixel; its latency in milliseconds."""
    height, width = size
    point = [[float(rng.uniform(0, width)), float(rng.uniform(0, height))]]
    start = time.perf_counter()
    response = client.post("/api/images/1/predict", json={"points": point, "labels": [1]})
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed


def summary(name: str, times: list[float]) -> str:
    if not times:
        return f"{name:<28} no clicks measured"
    p50, p95 = statistics.median(times), float(np.percentile(times, 95))
    figures = f"p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  max {max(times):7.1f} ms"
    return f"{name:<28} n={len(times):3d}  {figures}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    image = picture(args.image)
    size = image.shape[:2]
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        images.mkdir()
        Image.fromarray(image).save(images / "picture.png")
        settings = ServeSettings(
            images_dir=images, project_dir=Path(folder) / "project", disk_cache=False
        )
        client = TestClient(create_app(model_for(args.model), settings))
        start = time.perf_counter()
        client.post("/api/images/1/embedding").raise_for_status()
        print(f"model {args.model}, {size[1]}x{size[0]} picture, {args.threads} threads")
        print(f"embedding: {time.perf_counter() - start:.2f} s")
        for _ in range(3):  # warm-up
            click_ms(client, rng, size)
        idle = [click_ms(client, rng, size) for _ in range(args.clicks)]

        options = {"points_per_side": args.points_per_side, "crop_n_layers": args.crop_n_layers}
        if args.relaxed:
            options.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
        job = client.post("/api/images/1/everything/jobs", json=options)
        job.raise_for_status()
        job_id = job.json()["id"]
        started = time.perf_counter()
        busy: list[float] = []
        while len(busy) < args.clicks:
            elapsed = click_ms(client, rng, size)
            state = client.get(f"/api/jobs/{job_id}").json()
            if state["status"] != "running":
                break  # the job ended during this click: it does not count
            busy.append(elapsed)
        state = client.get(f"/api/jobs/{job_id}").json()
        job_seconds = time.perf_counter() - started
        client.delete(f"/api/jobs/{job_id}")
        while state["status"] not in FINAL:
            time.sleep(0.05)
            state = client.get(f"/api/jobs/{job_id}").json()

    print(summary("clicks, server idle", idle))
    print(summary("clicks, long job running", busy))
    job_options = ", ".join(f"{key}={value}" for key, value in options.items())
    print(
        f"job ({job_options}): {state['progress']:.0%} done after {job_seconds:.1f} s, "
        f"then {state['status']} on request"
    )


if __name__ == "__main__":
    main()

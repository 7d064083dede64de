"""Render ``docs/screenshot.png``: ``segany serve`` in headless Chromium, a mask on a photo.

    python docs/make_screenshot.py --model vit_b             # the model segments the cat
    python docs/make_screenshot.py --checkpoint FILE         # same, with a weights file
    python docs/make_screenshot.py                           # the reference mask, no model

With a model, the cat is segmented from one click, named and saved through the page, and a
second click leaves a live candidate on the laptop. Without one, the COCO-MVal reference
mask of the cat is saved through the API instead, so the picture shows the tool, not a
model's quality.

The photo comes from ``../shared/data/coco-mval`` (COCO val2017, not part of this
repository); only the rendering is kept. Needs Chromium (``apt-get install chromium``) and
the ``serve`` and ``test`` extras.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from browser import chromium, live_server  # noqa: E402

from segany.loading import load_model  # noqa: E402
from segany.serve import ServeSettings, create_app  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "coco-mval"
PHOTO = "000000001675"  # a cat on a laptop
OBJECT = "cat09"
SECOND_CLICK = (330, 420)  # on the laptop's keyboard
MAX_BYTES = 300_000


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel farthest from its border, as a person would click it."""
    import cv2

    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def screen_point(page, x: float, y: float) -> tuple[float, float]:
    box = page.locator("#canvas").bounding_box()
    width, height = page.evaluate(
        "() => { const c = document.getElementById('canvas'); return [c.width, c.height]; }"
    )
    return box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box[
        "height"
    ] / height


def wait_idle(page) -> None:
    page.wait_for_function("() => document.body.dataset.busy === '0'")


def segment_with_clicks(page, mask: np.ndarray) -> None:
    """Click the cat, name it, save it; then click the laptop for a live candidate."""
    page.mouse.click(*screen_point(page, *interior_point(mask)))
    page.wait_for_function("() => document.getElementById('canvas').dataset.candidates === '3'")
    wait_idle(page)
    page.fill("#label", "cat")
    page.press("#label", "Enter")
    page.wait_for_function("() => document.getElementById('canvas').dataset.objects === '1'")
    page.mouse.click(*screen_point(page, *SECOND_CLICK))
    page.wait_for_function("() => document.getElementById('canvas').dataset.candidates === '3'")
    wait_idle(page)


def save_reference_mask(page, mask: np.ndarray) -> None:
    """Save the data set's mask of the cat as an object through the API, then reload."""
    coco = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    body = {"mask": {"size": coco["size"], "counts": coco["counts"].decode()}, "label": "cat"}
    assert page.request.post("/api/images/1/objects", data=body).status == 201
    page.reload()
    page.wait_for_function("() => document.getElementById('canvas').dataset.objects === '1'")
    wait_idle(page)


def small_png(png: bytes, target: Path) -> None:
    """Save a screenshot as a 256-colour PNG (the UI has few colours; the photo dithers)."""
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    size = target.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{target} is {size} bytes, more than {MAX_BYTES}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="registry model name (e.g. vit_b)")
    parser.add_argument("--checkpoint", help="weights file")
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "screenshot.png"))
    args = parser.parse_args()
    real_model = bool(args.model or args.checkpoint)
    mask = np.asarray(Image.open(DATA / "masks" / f"{PHOTO}__{OBJECT}.png")) > 0
    with tempfile.TemporaryDirectory() as work:
        images = Path(work) / "images"
        images.mkdir()
        shutil.copy(DATA / "images" / f"{PHOTO}.jpg", images / "cat-on-laptop.jpg")
        model = load_model(args.model, args.checkpoint, "cpu")
        name = args.model or (Path(args.checkpoint).name if args.checkpoint else "default")
        settings = ServeSettings(images, Path(work) / "project", model_name=name)
        with live_server(create_app(model, settings)) as url, chromium() as browser:
            page = browser.new_page(base_url=url, viewport={"width": 1180, "height": 720})
            page.goto("/")
            page.wait_for_function(
                "() => document.getElementById('canvas').dataset.imageId === '1'"
            )
            wait_idle(page)
            if real_model:
                segment_with_clicks(page, mask)
            else:
                save_reference_mask(page, mask)
            page.locator("header").click()  # no focus ring in the picture
            small_png(page.screenshot(), Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

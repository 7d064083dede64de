"""``segany serve`` end to end: a real server in a thread and the page in headless Chromium.

What the page draws is read back from its canvas and compared, pixel for pixel, with the
masks the API sent; those masks are compared with SamPredictor's own; the object saved
through the page is read back from the API and from the exported COCO file (pycocotools).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import CHROMIUM, chromium, live_server
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from reference import TINY_CONFIG, randomize_

from segany.build import build_sam_from_config
from segany.images import read_image
from segany.predictor import SamPredictor
from segany.serve import ServeSettings, create_app

if not Path(CHROMIUM).is_file():
    # A failure, not a skip: `make test` installs Chromium, and a skip would hide the feature.
    pytest.fail(
        f"the browser tests need Chromium at {CHROMIUM}: run `make test` (as root) "
        "or apt-get install chromium",
        pytrace=False,
    )

CLICK = (60, 50)  # image pixel clicked first
MARKER_RADIUS = 8  # pixels around a prompt point where the page draws its dot
RELAXED = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(replace(TINY_CONFIG, img_size=256)), 0).eval()


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in (("a.png", (120, 160)), ("b.png", (100, 100))):
        coarse = rng.integers(0, 256, (height // 10, width // 10, 3))
        pixels = np.kron(coarse, np.ones((10, 10, 1))).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


@pytest.fixture
def page(model, images_dir: Path):
    """The page of a fresh server over ``images_dir``, first image open and embedded."""
    app = create_app(model, ServeSettings(images_dir=images_dir, project_dir=images_dir / "p"))
    errors: list[str] = []
    with live_server(app) as url, chromium() as browser:
        context = browser.new_context(
            base_url=url, viewport={"width": 1200, "height": 760}, accept_downloads=True
        )
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto("/")
        wait_idle(page, image_id=1)
        yield page
        context.close()
    assert errors == []


def wait_idle(page, **state: object) -> None:
    """Wait until no request is pending and the canvas shows ``state`` (data-* values)."""
    checks = " && ".join(
        f"canvas.dataset.{re.sub('_(.)', lambda m: m[1].upper(), key)} === {json.dumps(str(value))}"
        for key, value in state.items()
    )
    page.wait_for_function(
        "() => { const canvas = document.getElementById('canvas');"
        f" return document.body.dataset.busy === '0' && {checks or 'true'}; }}"
    )


def screen_point(page, x: float, y: float) -> tuple[float, float]:
    """Where image pixel (x, y) is on the screen (the canvas is scaled to fit)."""
    box = page.locator("#canvas").bounding_box()
    size = page.evaluate(
        "() => { const c = document.getElementById('canvas'); return [c.width, c.height]; }"
    )
    return box["x"] + (x + 0.5) * box["width"] / size[0], box["y"] + (y + 0.5) * box[
        "height"
    ] / size[1]


def predict_after(page, action) -> tuple[dict, dict]:
    """Run ``action`` and return the /predict request body and response it caused."""
    with page.expect_response(lambda r: r.url.endswith("/predict")) as info:
        action()
    response = info.value
    return json.loads(response.request.post_data), response.json()


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def changed_pixels(page) -> np.ndarray:
    """(H, W) bool: where the canvas differs from the bare image decoded by the same browser."""
    drawn, bare = page.evaluate(
        """async () => {
            const canvas = document.getElementById('canvas');
            const read = (c) =>
                Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
            const picture = new Image();
            picture.src = `/api/images/${canvas.dataset.imageId}/pixels`;
            await picture.decode();
            const plain = document.createElement('canvas');
            plain.width = canvas.width; plain.height = canvas.height;
            plain.getContext('2d').drawImage(picture, 0, 0);
            return [read(canvas), read(plain)];
        }"""
    )
    height, width = page.evaluate(
        "() => { const c = document.getElementById('canvas'); return [c.height, c.width]; }"
    )
    difference = np.array(drawn) != np.array(bare)
    return difference.reshape(height, width, 4).any(axis=-1)


def assert_drawn(page, mask: np.ndarray, points: list[list[float]] = ()) -> None:
    """The canvas shows exactly ``mask`` tinted, apart from the prompt dots."""
    changed = changed_pixels(page)
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    away = np.ones(mask.shape, bool)
    for x, y in points:
        away &= np.hypot(xs - x, ys - y) > MARKER_RADIUS
    assert 0 < mask.sum() < mask.size  # a real test: something inside and outside
    np.testing.assert_array_equal(changed[away], mask[away])


def test_click_pick_name_export(page, model, images_dir: Path, tmp_path: Path) -> None:
    # A click gives three candidates: the predictor's own masks, the best one drawn.
    request, answer = predict_after(page, lambda: page.mouse.click(*screen_point(page, *CLICK)))
    assert request["labels"] == [1] and request["box"] is None
    assert np.allclose(request["points"], [CLICK], atol=1)
    predictor = SamPredictor(model)
    predictor.set_image(read_image(images_dir / "a.png"))
    masks, _, _ = predictor.predict(np.array(request["points"]), np.array(request["labels"]))
    for candidate, mask in zip(answer["candidates"], masks, strict=True):
        np.testing.assert_array_equal(decode(candidate["mask"]), mask)
    best = answer["best"]
    wait_idle(page, candidates=3, selected=best, mask_count=1)
    assert_drawn(page, masks[best], request["points"])

    # Another candidate.
    other = (best + 1) % 3
    page.click(f"#candidates button[data-index='{other}']")
    wait_idle(page, selected=other)
    assert_drawn(page, masks[other], request["points"])

    # Name it and save it (Enter in the label field): the page now draws the saved object.
    page.fill("#label", "widget")
    page.press("#label", "Enter")
    wait_idle(page, objects=1, candidates=0, mask_count=1)
    [saved] = page.request.get("/api/images/1/objects").json()
    assert (saved["label"], saved["source"]) == ("widget", "manual")
    assert saved["prompts"]["points"] == request["points"]
    np.testing.assert_array_equal(decode(saved["mask"]), masks[other])
    assert_drawn(page, masks[other])

    # A dragged box, undone; a right click is a background point, cleared with Esc.
    def drag() -> None:
        page.mouse.move(*screen_point(page, 20, 20))
        page.mouse.down()
        page.mouse.move(*screen_point(page, 100, 90), steps=5)
        page.mouse.up()

    request, _ = predict_after(page, drag)
    assert request["points"] == [] and np.allclose(request["box"], [20, 20, 100, 90], atol=1.5)
    wait_idle(page, candidates=3)
    page.keyboard.press("Control+z")
    wait_idle(page, candidates=0)
    request, _ = predict_after(
        page, lambda: page.mouse.click(*screen_point(page, 30, 30), button="right")
    )
    assert request["labels"] == [0]
    wait_idle(page, candidates=3)
    page.keyboard.press("Escape")
    wait_idle(page, candidates=0, mask_count=1)

    # Rename in the object list.
    row = page.locator(f"#objects li[data-object-id='{saved['id']}'] input")
    row.fill("gadget")
    with page.expect_response(lambda r: r.request.method == "PATCH") as renamed:
        row.press("Enter")
    assert renamed.value.status == 200
    assert page.request.get(f"/api/objects/{saved['id']}").json()["label"] == "gadget"

    # Export: the downloaded COCO file holds the object's mask under its label.
    with page.expect_download() as download:
        page.click("#export-coco")
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    coco = COCO(str(exported))
    [annotation] = coco.loadAnns(coco.getAnnIds())
    np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), masks[other])
    assert coco.loadCats(annotation["category_id"])[0]["name"] == "gadget"

    # Next image, then a reload: the saved object is still there.
    page.locator("header").click()
    page.keyboard.press("ArrowRight")
    wait_idle(page, image_id=2, objects=0)
    page.reload()
    wait_idle(page, image_id=1, objects=1)
    assert_drawn(page, masks[other])


def test_zoom_choice_is_sent_with_the_prompts(page) -> None:
    # Shown for a SAM-family model; ticking it asks again for the same prompts, zoomed.
    assert page.locator("#zoom").is_visible()
    request, _ = predict_after(page, lambda: page.mouse.click(*screen_point(page, *CLICK)))
    assert request["zoom"] is False
    wait_idle(page, candidates=3)
    request, answer = predict_after(page, lambda: page.check("#zoom"))
    assert request["zoom"] is True and np.allclose(request["points"], [CLICK], atol=1)
    assert len(answer["candidates"]) == 3


def test_segment_everything_and_keep(page) -> None:
    def relaxed(route) -> None:  # a random-weight model passes no quality threshold
        options = {**json.loads(route.request.post_data), **RELAXED}
        route.continue_(post_data=json.dumps(options))

    page.route("**/everything", relaxed)
    assert page.get_attribute("#points-per-side", "max") == "64"  # the server's limit
    page.fill("#points-per-side", "4")
    with page.expect_response(lambda r: r.url.endswith("/everything")) as info:
        page.click("#everything")
    proposals = info.value.json()
    assert json.loads(info.value.request.post_data)["points_per_side"] == 4
    assert proposals and all(p["source"] == "proposal" for p in proposals)
    wait_idle(page, objects=len(proposals))
    assert page.locator("#objects li.proposal").count() == len(proposals)
    page.click("#keep-all")
    wait_idle(page, objects=len(proposals))
    page.wait_for_function("() => document.querySelectorAll('#objects li.auto').length > 0")
    sources = {o["source"] for o in page.request.get("/api/images/1/objects").json()}
    assert sources == {"auto"}

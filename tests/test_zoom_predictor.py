"""ZoomPredictor: small objects predicted on a crop, checked against crops made by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import TINY_CONFIG, randomize_

from segany import SamPredictor, SeganyError, ZoomPredictor, sam_model_registry
from segany.build import build_sam_from_config
from segany.evaluate import simulate_clicks
from segany.inference.postprocess import downscale_logits, upscale_logits_fast
from segany.zoom_predictor import crop_around

HEIGHT, WIDTH = 300, 400


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(TINY_CONFIG), seed=3)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture()
def zoom(model, image) -> ZoomPredictor:
    zoom = ZoomPredictor(SamPredictor(model, precision="fp32"))
    zoom.set_image(image)
    return zoom


@pytest.fixture(scope="module")
def default_model():
    return sam_model_registry["default"]()


def disc_image(x: int = 200, y: int = 150, radius: int = 12) -> np.ndarray:
    """A dark disc on a noisy light background."""
    rng = np.random.default_rng(2)
    image = rng.integers(170, 230, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    image[(xs - x) ** 2 + (ys - y) ** 2 <= radius**2] = (40, 30, 60)
    return image


def on_window(model, image, window, **prompts):
    """A fresh predictor on image[window] with ``prompts`` (already in the window's
    pixels); its logits placed in a full-size canvas of each mask's lowest logit."""
    top, bottom, left, right = window
    height, width = image.shape[:2]
    predictor = SamPredictor(model, precision="fp32")
    predictor.set_image(np.ascontiguousarray(image[top:bottom, left:right]))
    logits, scores, _ = predictor.predict(**prompts, return_logits=True)
    canvas = np.empty((len(logits), height, width), np.float32)
    canvas[:] = logits.min(axis=(1, 2))[:, None, None]
    canvas[:, top:bottom, left:right] = logits
    return canvas, scores


def zoom_on(model, image) -> ZoomPredictor:
    zoom = ZoomPredictor(SamPredictor(model, precision="fp32"))
    zoom.set_image(image)
    return zoom


def test_small_box_is_predicted_on_a_crop_three_times_its_size(default_model) -> None:
    # A 24 px box: crop side 3 x 24 = 72 px (above the 48 px least), centred on (200, 150).
    # A trained model (the bundled one) keeps the disc's mask inside the crop.
    image = disc_image()
    zoom = zoom_on(default_model, image)
    logits, scores, low_res = zoom.predict(box=[188, 138, 212, 162], return_logits=True)
    window = (114, 186, 164, 236)
    expected, expected_scores = on_window(default_model, image, window, box=[24, 24, 48, 48])
    assert zoom.crop is not None
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    assert low_res.shape == (3, 128, 128)  # the full frame of a 512 px model
    masks, _, _ = zoom.predict(box=[188, 138, 212, 162])
    assert masks.dtype == bool and np.array_equal(masks, expected > 0)


def test_crop_is_shifted_inside_the_image_at_its_edge(default_model) -> None:
    # A 10 px box in the corner: the 48 px least crop, pushed to start at (0, 0).
    image = disc_image(8, 9, 4)
    zoom = zoom_on(default_model, image)
    box = [3, 4, 13, 14]
    logits, _, _ = zoom.predict(box=box, multimask_output=False, return_logits=True)
    expected, _ = on_window(default_model, image, (0, 48, 0, 48), box=box, multimask_output=False)
    assert zoom.crop is not None
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_a_mask_cut_by_the_crop_falls_back_to_the_whole_image(zoom) -> None:
    # A random model's masks are noise over the whole crop, so they reach its edges.
    got = zoom.predict(box=[100, 100, 120, 116])
    assert zoom.crop is not None  # the crop was tried
    for a, b in zip(got, zoom.predictor.predict(box=[100, 100, 120, 116]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_large_objects_are_predicted_as_without_zoom(zoom) -> None:
    # Crop side 3 x 150 > half the image's 400 px: no zoom.
    for prompts in (
        {"box": [100, 50, 250, 200]},
        {"box": [100, 50, 250, 200], "point_coords": [[180, 120]], "point_labels": [1]},
    ):
        got = zoom.predict(**prompts)
        plain = zoom.predictor.predict(**prompts)
        for a, b in zip(got, plain, strict=True):
            np.testing.assert_array_equal(a, b)


def test_clicks_zoom_on_the_first_mask_and_keep_points_inside_the_crop(default_model):
    # A trained model (the bundled one) finds the small disc, so the clicks are zoomed.
    image = disc_image()
    zoom = zoom_on(default_model, image)
    point, background = np.array([[200.0, 150.0]]), np.array([[390.0, 10.0]])
    coords, labels = np.concatenate([point, background]), np.array([1, 0])
    plain, _, _ = zoom.predictor.predict(coords, labels)
    ys, xs = np.nonzero(plain.any(axis=0))
    assert len(xs) < 50 * 50, "the bundled model should find the disc"
    region = np.array(
        [min(xs.min(), 200), min(ys.min(), 150), max(xs.max() + 1, 200), max(ys.max() + 1, 150)]
    )
    window = crop_around(region, (HEIGHT, WIDTH), 3.0, 48)
    logits, scores, _ = zoom.predict(coords, labels, return_logits=True)
    assert zoom.crop == window
    # The background click lies outside the crop: left out there.
    expected, expected_scores = on_window(
        default_model,
        image,
        (window.y0, window.y1, window.x0, window.x1),
        point_coords=point - [window.x0, window.y0],
        point_labels=[1],
    )
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


def test_crop_window_by_hand() -> None:
    # 3 x 20 = 60 px square centred on the box, and clipped where the image is smaller.
    assert crop_around(np.array([100, 100, 120, 116]), (300, 400), 3.0, 48).size == (60, 60)
    window = crop_around(np.array([390, 5, 398, 9]), (300, 400), 3.0, 48)
    assert (window.x0, window.y0, window.x1, window.y1) == (352, 0, 400, 48)
    narrow = crop_around(np.array([0, 0, 30, 10]), (20, 400), 3.0, 48)
    assert (narrow.x0, narrow.y0, narrow.x1, narrow.y1) == (0, 0, 90, 20)


def test_crop_embedding_is_reused_while_prompts_stay_on_the_object(zoom, monkeypatch) -> None:
    zoom.predict(box=[100, 100, 120, 116])
    calls = []
    original = zoom.crop_predictor.set_image
    monkeypatch.setattr(
        zoom.crop_predictor, "set_image", lambda *a, **k: (calls.append(1), original(*a, **k))
    )
    zoom.predict(box=[100, 100, 120, 116], point_coords=[[110, 108]], point_labels=[1])
    assert calls == []
    zoom.predict(box=[300, 200, 320, 216])
    assert calls == [1]


def test_low_res_logits_go_back_to_the_full_frame(model) -> None:
    # Smooth logits in the image part of the low-res frame survive up- and downscaling.
    grid = torch.linspace(-1, 1, 256)
    low_res = (8 * (0.5 - grid[:, None] ** 2 - grid[None, :] ** 2))[None, None]
    size, input_size = model.image_size, (768, 1024)  # a 300x400 image at 1024 px
    assert size == 1024
    full = upscale_logits_fast(low_res, size, input_size, (HEIGHT, WIDTH))
    back = downscale_logits(full, size, input_size, (256, 256))
    inner = (slice(None), slice(None), slice(4, 188), slice(4, 252))
    np.testing.assert_allclose(back[inner], low_res[inner], atol=0.05)
    assert float(back[..., 200:, :].max()) <= float(full.min()) + 1e-6  # padding: lowest


def test_results_feed_back_as_mask_input_in_the_click_loop(model, image) -> None:
    zoom = ZoomPredictor(SamPredictor(model, precision="fp32"))
    zoom.set_image(image)
    target = np.zeros((HEIGHT, WIDTH), bool)
    target[100:118, 100:121] = True
    trajectory = simulate_clicks(zoom, target, None, max_clicks=3)
    assert len(trajectory.ious) >= 1 and all(0.0 <= v <= 1.0 for v in trajectory.ious)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": 0.5}, "context must be at least 1"),
        ({"min_zoom": 1.0}, "min_zoom must be above 1"),
        ({"min_side": 0}, "min_side must be at least 1"),
    ],
)
def test_bad_options_are_clear(model, kwargs, message) -> None:
    with pytest.raises(SeganyError, match=message):
        ZoomPredictor(SamPredictor(model), **kwargs)


def test_bad_use_is_clear(model, zoom) -> None:
    with pytest.raises(SeganyError, match="SamPredictor"):
        ZoomPredictor(object())  # type: ignore[arg-type]
    with pytest.raises(SeganyError, match="set an image"):
        ZoomPredictor(SamPredictor(model)).predict(box=[1, 1, 5, 5])
    with pytest.raises(SeganyError, match="give a prompt"):
        zoom.predict()
    with pytest.raises(SeganyError, match="outside the 400x300 image"):
        zoom.predict(point_coords=[[500, 10]], point_labels=[1])


def test_segment_cli_zoom_writes_the_zoomed_mask(tmp_path, checkpoint, capsys) -> None:
    from PIL import Image

    from segany.cli import main
    from segany.loading import load_model

    image = np.random.default_rng(4).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    path, out = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.fromarray(image).save(path)
    args = ["segment", str(path), "--box", "100,100,120,116", "--zoom", "-o", str(out)]
    assert main([*args, "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    zoom = ZoomPredictor(SamPredictor(load_model(checkpoint=checkpoint)))
    zoom.set_image(image)
    masks, scores, _ = zoom.predict(box=[100, 100, 120, 116], multimask_output=False)
    assert zoom.crop is not None
    assert np.array_equal(np.asarray(Image.open(out)) > 0, masks[0])
    assert f"score {scores[0]:.3f}" in capsys.readouterr().out


def test_attach_image_uses_the_embedding_the_predictor_holds(model, image, zoom) -> None:
    holder = SamPredictor(model, precision="fp32")
    holder.set_image_embedding(
        zoom.predictor.get_image_embedding(), (HEIGHT, WIDTH), zoom.predictor.high_res_features
    )
    attached = ZoomPredictor(holder)
    with pytest.raises(SeganyError, match="embedding of another size"):
        attached.attach_image(image[:100])
    attached.attach_image(image)
    box = [100, 50, 250, 200]  # large: the whole image's embedding answers
    for a, b in zip(attached.predict(box=box), zoom.predict(box=box), strict=True):
        np.testing.assert_array_equal(a, b)
    attached.predict(box=[100, 100, 120, 116])
    zoom.predict(box=[100, 100, 120, 116])
    assert attached.crop is not None and attached.crop == zoom.crop

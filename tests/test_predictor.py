"""Predictor input checks and the features beyond the official predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import TINY_CONFIG, randomize_

from segany import SamPredictor, SeganyError
from segany.build import build_sam_from_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(TINY_CONFIG), seed=2)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(120, 200, 3), (300, 90, 3)]]


@pytest.fixture(scope="module")
def predictor(model, images) -> SamPredictor:
    predictor = SamPredictor(model)
    predictor.set_image(images[0])
    return predictor


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"point_coords": [[10, 10]], "point_labels": [2]}, "point label 2 is not allowed"),
        ({"point_coords": [[10, 10]], "point_labels": [-1]}, "point label -1 is not allowed"),
        ({"point_coords": [[10, 10], [20, 20]], "point_labels": [1]}, "2 points but 1 labels"),
        ({"point_coords": [[float("nan"), 10]], "point_labels": [1]}, "NaN"),
        (
            {"point_coords": [[250, 10]], "point_labels": [1]},
            "point (250, 10) is outside the 200x120 image",
        ),
        ({"point_coords": [[10, -1]], "point_labels": [1]}, "outside"),
        ({"point_coords": [[10, 10]]}, "must be given together"),
        ({"point_coords": [10, 10], "point_labels": [1]}, "shape (N, 2)"),
        ({"box": [50, 10, 20, 40]}, "x1 < x0"),
        ({"box": [10, 50, 20, 40]}, "y1 < y0"),
        ({"box": [10, 10, 20]}, "shape (4,)"),
        ({"box": [300, 10, 400, 40]}, "outside the 200x120 image"),
        ({"box": [0, 0, float("inf"), 10]}, "NaN or infinite"),
        ({"mask_input": np.zeros((1, 64, 64))}, "mask_input must have shape (1, 256, 256)"),
        ({"point_coords": [["a", 1]], "point_labels": [1]}, "must be numeric"),
    ],
)
def test_bad_prompts_are_clear_value_errors(predictor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        predictor.predict(**kwargs)
    assert isinstance(caught.value, SeganyError)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((10, 10), np.uint8), "(H, W, 3)"),
        (np.zeros((10, 10, 4), np.uint8), "(H, W, 3)"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        ([[1, 2, 3]], "(H, W, 3)"),
    ],
)
def test_bad_images_are_rejected(model, image, message: str) -> None:
    with pytest.raises(SeganyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamPredictor(model).set_image(image)


def test_predict_before_set_image_raises(model) -> None:
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(model).predict(point_coords=[[1, 1]], point_labels=[1])


def test_bad_image_format(model, images) -> None:
    with pytest.raises(SeganyError, match="image_format"):
        SamPredictor(model).set_image(images[0], image_format="HSV")


def test_bgr_input_equals_rgb(model, images) -> None:
    rgb, bgr = SamPredictor(model), SamPredictor(model)
    rgb.set_image(images[0])
    bgr.set_image(np.ascontiguousarray(images[0][..., ::-1]), image_format="BGR")
    torch.testing.assert_close(rgb.get_image_embedding(), bgr.get_image_embedding(), atol=0, rtol=0)


def test_saved_embedding_gives_the_same_masks(model, predictor, images, tmp_path) -> None:
    path = tmp_path / "embedding.pt"
    torch.save(predictor.get_image_embedding(), path)
    reused = SamPredictor(model)
    reused.set_image_embedding(torch.load(path, weights_only=True), images[0].shape[:2])
    prompt = {"point_coords": [[50, 60]], "point_labels": [1], "box": [20, 30, 150, 100]}
    for a, b in zip(predictor.predict(**prompt), reused.predict(**prompt)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SeganyError, match="expects"):
        reused.set_image_embedding(torch.zeros(1, 256, 32, 32), (10, 10))


def test_image_batch_equals_one_by_one(model, images) -> None:
    batch = SamPredictor(model)
    batch.set_image_batch(images, batch_size=2)
    points = [np.array([[50.0, 60.0]]), np.array([[40.0, 200.0], [10.0, 10.0]])]
    labels = [np.array([1]), np.array([1, 0])]
    masks, scores, low_res = batch.predict_batch(points, labels, [None, [5, 5, 80, 290]])
    for index, image in enumerate(images):
        single = SamPredictor(model)
        single.set_image(image)
        box = None if index == 0 else [5, 5, 80, 290]
        expected = single.predict(points[index], labels[index], box)
        torch.testing.assert_close(
            batch.get_image_embedding()[index : index + 1],
            single.get_image_embedding(),
            atol=1e-4,
            rtol=0,
        )
        np.testing.assert_allclose(scores[index], expected[1], atol=1e-4)
        np.testing.assert_allclose(low_res[index], expected[2], atol=1e-4)
        assert masks[index].shape == expected[0].shape == (3, *image.shape[:2])
    with pytest.raises(SeganyError, match="predict_batch"):
        batch.predict(points[0], labels[0])
    with pytest.raises(SeganyError, match="1 prompts given for 2 images"):
        batch.predict_batch([points[0]], [labels[0]])


def test_prompt_sets_of_equal_size_equal_single_calls(model, images) -> None:
    # fp32: in bf16 the batch shares the image side in differently shaped products, which
    # round differently from a single call's.
    predictor = SamPredictor(model, "fp32")
    predictor.set_image(images[0])
    coords = [np.array([[20.0, 30.0], [100.0, 50.0]]), np.array([[150.0, 90.0], [10.0, 100.0]])]
    labels = [np.array([1, 0]), np.array([1, 1])]
    boxes = np.array([[5, 5, 120, 100], [60, 20, 199, 119]])
    masks, scores, _ = predictor.predict_prompts(coords, labels, boxes, multimask_output=False)
    assert masks.shape == (2, 1, 120, 200) and scores.shape == (2, 1)
    for i in range(2):
        single = predictor.predict(coords[i], labels[i], boxes[i], multimask_output=False)
        np.testing.assert_allclose(scores[i], single[1], atol=1e-5)
        np.testing.assert_array_equal(masks[i], single[0])
    with pytest.raises(SeganyError, match="disagree"):
        predictor.predict_prompts(coords, labels, boxes[:1])

"""segany's ``Sam2ImagePredictor`` against Meta's ``SAM2ImagePredictor`` (``sam2`` 1.1.0).

Both run the same random weights (tests/sam2_reference.py). In fp32 the masks, scores and
low-res logits must agree to 1e-4, with the same shapes and dtypes, for every kind of
prompt Meta takes; in bf16 the masks must overlap Meta's (IoU > 0.9). Clicks after the
first reuse the image side prepared for the decoder, and bad input is a one-line
SeganyError. Each embedding at 1024 px takes seconds, so every predictor with an image is
a module fixture, embedded once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2_reference import IMAGE_SIZE, PROMPTS, assert_close, meta_sam2, photo, segany_sam2

import segany
from segany import SeganyError
from segany.inference.mask_decoder import FastMaskDecoder
from segany.inference.precision import cpu_has_native_bf16
from segany.modeling.sam2 import Sam2
from segany.sam2_predictor import ImageNotSetError, Sam2ImagePredictor, _rgb_pixels

HEIGHT, WIDTH = IMAGE_SIZE
# A second image for the batch calls: portrait, smaller than the model input.
SECOND_SIZE = (480, 360)
BOX = np.array([350.0, 120.0, 980.0, 520.0])
TWO_BOXES = np.array([[350.0, 120.0, 980.0, 520.0], [60.0, 300.0, 500.0, 590.0]])

# PROMPTS (one of each kind) and the batched forms Meta takes.
ALL_PROMPTS = {
    **PROMPTS,
    "two boxes": {"box": TWO_BOXES},
    "two boxes with clicks": {
        "box": TWO_BOXES,
        "point_coords": np.array([[[700.0, 250.0]], [[200.0, 450.0]]]),
        "point_labels": np.array([[1], [0]]),
    },
    "padded point sets": {  # -1 pads the shorter set, as Meta's users do
        "point_coords": np.array([[[700.0, 250.0], [300.0, 420.0]], [[600.0, 550.0], [0, 0]]]),
        "point_labels": np.array([[1, 0], [1, -1]]),
    },
}


@pytest.fixture(scope="module")
def meta_model() -> SAM2Base:
    return meta_sam2()


@pytest.fixture(scope="module")
def model(meta_model: SAM2Base) -> Sam2:
    return segany_sam2(meta_model)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [photo(*IMAGE_SIZE), photo(*SECOND_SIZE, seed=1)]


@pytest.fixture(scope="module")
def meta_batch(meta_model: SAM2Base, images: list[np.ndarray]) -> SAM2ImagePredictor:
    predictor = SAM2ImagePredictor(meta_model)
    predictor.set_image_batch(images)
    return predictor


@pytest.fixture(scope="module")
def meta_predictor(meta_model: SAM2Base, meta_batch: SAM2ImagePredictor) -> SAM2ImagePredictor:
    """Meta's predictor on the first image, given the features its ``set_image_batch``
    computed as Meta's users give cached features (an embedding less to wait for;
    tests/test_sam2_image.py holds Meta's ``set_image`` to segany's encoder)."""
    predictor = SAM2ImagePredictor(meta_model)
    features = meta_batch._features
    predictor._features = {
        "image_embed": features["image_embed"][:1],
        "high_res_feats": [level[:1] for level in features["high_res_feats"]],
    }
    predictor._orig_hw = meta_batch._orig_hw[:1]
    predictor._is_image_set = True
    return predictor


@pytest.fixture(scope="module")
def predictor(model: Sam2, images: list[np.ndarray]) -> Sam2ImagePredictor:
    predictor = Sam2ImagePredictor(model, precision="fp32")
    predictor.set_image(images[0])
    return predictor


@pytest.fixture(scope="module")
def batch_predictor(model: Sam2, images: list[np.ndarray]) -> Sam2ImagePredictor:
    predictor = Sam2ImagePredictor(model, precision="fp32")
    predictor.set_image_batch(images)
    return predictor


def unset_predictor(model: Sam2, **kwargs) -> Sam2ImagePredictor:
    """A predictor with no image (cheap: nothing is embedded)."""
    return Sam2ImagePredictor(model, precision="fp32", **kwargs)


def with_features_of(source: Sam2ImagePredictor, **kwargs) -> Sam2ImagePredictor:
    """A new predictor given ``source``'s image as code that caches Meta's features does:
    by assigning ``_features``, ``_orig_hw`` and ``_is_image_set``."""
    predictor = unset_predictor(source.model, **kwargs)
    predictor._features = source._features
    predictor._orig_hw = list(source._orig_hw)
    predictor._is_image_set = True
    return predictor


def assert_predictions_close(got, expected, name: str) -> None:
    for part, actual, reference in zip(("masks", "scores", "low_res"), got, expected, strict=True):
        assert_close(actual, reference, f"{name} {part}")


# -- the image --------------------------------------------------------------------------


def assert_features_close(got: dict, expected: dict) -> None:
    """Two ``_features`` dicts (Meta's layout) agree."""
    assert_close(got["image_embed"].numpy(), expected["image_embed"].numpy(), "image_embed")
    pairs = zip(got["high_res_feats"], expected["high_res_feats"], strict=True)
    for level, (ours, theirs) in enumerate(pairs):
        assert_close(ours.numpy(), theirs.numpy(), f"high_res_feats[{level}]")


def test_features_match_meta(predictor, meta_predictor) -> None:
    assert predictor._is_image_set and not predictor._is_batch
    assert predictor._orig_hw == [tuple(hw) for hw in meta_predictor._orig_hw] == [IMAGE_SIZE]
    assert_features_close(predictor._features, meta_predictor._features)
    assert predictor.get_image_embedding() is predictor._features["image_embed"]
    assert tuple(predictor.get_image_embedding().shape) == (1, 256, 64, 64)


def test_pil_images_are_read_as_meta_reads_them(images) -> None:
    pil = Image.fromarray(images[1])
    assert np.array_equal(_rgb_pixels(pil, "image"), images[1])
    gray = Image.fromarray(images[1][..., 0])  # made RGB (Meta's predictor fails on it)
    assert _rgb_pixels(gray, "image").shape == (*SECOND_SIZE, 3)


# -- prompts ----------------------------------------------------------------------------


# Every kind of prompt, with one mask or three (each decode takes about a second on two
# busy cores; tests/test_sam2_image.py decodes every kind both ways).
PROMPT_CASES = [
    ("click", True),
    ("click", False),
    ("clicks", False),
    ("box", True),
    ("clicks and box", False),
    ("two objects", False),  # one set's single mask is stable, the other's is not
    ("two boxes", True),
    ("two boxes with clicks", False),
    ("padded point sets", True),
]


def case_id(case: tuple[str, bool]) -> str:
    return f"{case[0]}, {'multimask' if case[1] else 'single'}"


@pytest.mark.parametrize(
    ("prompt", "multimask"), PROMPT_CASES, ids=[case_id(c) for c in PROMPT_CASES]
)
def test_prompts_match_meta(predictor, meta_predictor, prompt: str, multimask: bool) -> None:
    kwargs = {**ALL_PROMPTS[prompt], "multimask_output": multimask, "return_logits": True}
    expected = meta_predictor.predict(**kwargs)
    got = predictor.predict(**kwargs)
    assert_predictions_close(got, expected, prompt)
    masks, scores, low_res = got
    objects = () if masks.ndim == 3 else (2,)
    count = 3 if multimask else 1
    assert masks.shape == (*objects, count, *IMAGE_SIZE)
    assert scores.shape == (*objects, count) and low_res.shape == (*objects, count, 256, 256)


def test_thresholded_masks_match_meta(predictor, meta_predictor) -> None:
    """Without ``return_logits`` the masks are float32 0/1, as Meta returns them, and follow
    ``mask_threshold`` (Meta's constructor argument and attribute)."""
    logits, _, _ = meta_predictor.predict(**PROMPTS["clicks and box"], return_logits=True)
    masks, _, _ = predictor.predict(**PROMPTS["clicks and box"])
    assert masks.dtype == np.float32 and 0 < masks.mean() < 1
    clear = np.abs(logits) > 1e-3  # pixels whose logit is not within rounding of 0
    assert np.array_equal(masks[clear], (logits > 0)[clear].astype(np.float32))
    strict = with_features_of(predictor, mask_threshold=2.0)
    strict_masks, _, _ = strict.predict(**PROMPTS["clicks and box"])
    clear = np.abs(logits - 2.0) > 1e-3
    assert np.array_equal(strict_masks[clear], (logits > 2.0)[clear].astype(np.float32))


@pytest.fixture(scope="module")
def previous_logits(meta_predictor) -> np.ndarray:
    """The best low-res logits (1, 256, 256) for a click: a mask prompt as a user gives it."""
    _, scores, low_res = meta_predictor.predict(**PROMPTS["click"], multimask_output=True)
    return low_res[np.argmax(scores)][None]


# Prompts besides the mask input, and whether to ask for three masks.
MASK_PROMPTS = {
    "mask alone": ({}, True),
    "mask and click": (
        {"point_coords": np.array([[320.0, 410.0]]), "point_labels": np.array([0])},
        False,
    ),
    "two boxes, one mask": ({"box": TWO_BOXES}, True),
    "two boxes, a mask each": ({"box": TWO_BOXES, "masks": 2}, False),
}


@pytest.mark.parametrize("prompt", MASK_PROMPTS)
def test_mask_input_matches_meta(predictor, meta_predictor, previous_logits, prompt: str) -> None:
    prompts, multimask = MASK_PROMPTS[prompt]
    kwargs = dict(prompts)
    mask_input = previous_logits
    if kwargs.pop("masks", None):  # (B, 1, 256, 256): one mask per box
        mask_input = np.stack([previous_logits, -previous_logits])
    kwargs |= {"mask_input": mask_input, "multimask_output": multimask, "return_logits": True}
    assert_predictions_close(predictor.predict(**kwargs), meta_predictor.predict(**kwargs), prompt)


def test_unnormalized_coords_match_meta(predictor, meta_predictor) -> None:
    """``normalize_coords=False``: coordinates are fractions 0-1 of the width and height."""
    prompt = "two boxes with clicks"
    kwargs = dict(ALL_PROMPTS[prompt])
    kwargs["point_coords"] = kwargs["point_coords"] / [WIDTH, HEIGHT]
    kwargs["box"] = kwargs["box"] / [WIDTH, HEIGHT, WIDTH, HEIGHT]
    kwargs |= {"normalize_coords": False, "return_logits": True}
    assert_predictions_close(predictor.predict(**kwargs), meta_predictor.predict(**kwargs), prompt)


def test_tensor_level_predict_matches_meta(predictor, meta_predictor) -> None:
    """``_predict`` on prompts in the model frame, as Meta's automatic mask generator calls
    it: (B, 1, 2) points, one per set."""
    points = torch.tensor([[[100.0, 900.0]], [[512.0, 300.0]], [[870.0, 640.0]]])
    labels = torch.ones(3, 1, dtype=torch.int)
    got = predictor._predict(points, labels, multimask_output=True, return_logits=True)
    expected = meta_predictor._predict(points, labels, multimask_output=True, return_logits=True)
    for name, actual, reference in zip(("masks", "iou", "low_res"), got, expected, strict=True):
        assert_close(actual.numpy(), reference.numpy(), name)


# -- several images ---------------------------------------------------------------------


def test_set_image_batch_matches_meta(batch_predictor, meta_batch) -> None:
    assert batch_predictor._is_batch and batch_predictor._is_image_set
    assert batch_predictor._orig_hw == [tuple(hw) for hw in meta_batch._orig_hw]
    assert tuple(batch_predictor.get_image_embedding().shape) == (2, 256, 64, 64)
    assert_features_close(batch_predictor._features, meta_batch._features)


def test_predict_batch_matches_meta(batch_predictor, meta_batch) -> None:
    """A click on the first image, two boxes on the second; one mask each."""
    kwargs = {
        "point_coords_batch": [np.array([[700.0, 250.0]]), None],
        "point_labels_batch": [np.array([1]), None],
        "box_batch": [None, np.array([[40.0, 60.0, 300.0, 400.0], [100.0, 10.0, 200.0, 90.0]])],
        "multimask_output": False,
        "return_logits": True,
    }
    got, expected = batch_predictor.predict_batch(**kwargs), meta_batch.predict_batch(**kwargs)
    for part, ours, theirs in zip(("masks", "scores", "low_res"), got, expected, strict=True):
        assert len(ours) == len(theirs) == 2
        for index, (actual, reference) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(actual, reference, f"image {index} {part}")
    assert got[0][1].shape == (2, 1, *SECOND_SIZE)


# -- precision and the image side -------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_predictor(model: Sam2, images: list[np.ndarray]) -> Sam2ImagePredictor:
    predictor = Sam2ImagePredictor(model, precision="bf16")
    predictor.set_image(images[0])
    return predictor


@pytest.mark.parametrize("prompt", ["click", "clicks and box"])
def test_bf16_masks_overlap_meta(bf16_predictor, meta_predictor, prompt: str) -> None:
    kwargs = {**PROMPTS[prompt], "multimask_output": True}
    masks, scores, low_res = bf16_predictor.predict(**kwargs)
    expected, _, _ = meta_predictor.predict(**kwargs)
    assert (masks.dtype, scores.dtype, low_res.dtype) == (np.float32,) * 3
    assert masks.shape == expected.shape and low_res.shape == (3, 256, 256)
    if not cpu_has_native_bf16():
        return  # emulated bfloat16: that it runs is all this CPU can show
    for index, (got, want) in enumerate(zip(masks > 0, expected > 0, strict=True)):
        union = (got | want).sum()
        iou = (got & want).sum() / union if union else 1.0
        assert iou > 0.9, f"{prompt} mask {index}: IoU {iou:.3f} with Meta's fp32"


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each image side the inference layer prepares (FastMaskDecoder.prepare_image)."""
    calls: list[int] = []
    original = FastMaskDecoder.prepare_image

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastMaskDecoder, "prepare_image", spy)
    return calls


def test_clicks_reuse_the_prepared_image_side(predictor, previous_logits, prepared) -> None:
    """The first decode prepares the image side; later clicks and boxes reuse it, a mask
    prompt does not need it, and new features (assigned as Meta's users do) drop it."""
    clicking = with_features_of(predictor)
    first = clicking.predict(**PROMPTS["click"], return_logits=True)
    assert len(prepared) == 1
    again = clicking.predict(**PROMPTS["click"], return_logits=True)
    clicking.predict(**PROMPTS["clicks and box"])
    clicking.predict(**PROMPTS["click"], mask_input=previous_logits)
    assert len(prepared) == 1
    for got, expected in zip(again, first, strict=True):
        assert np.array_equal(got, expected)
    clicking._features = predictor._features
    clicking.predict(**PROMPTS["click"])
    assert len(prepared) == 2


# -- errors -----------------------------------------------------------------------------


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert isinstance(error.value, SeganyError) and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("predict", r"set with .set_image\(...\) before mask prediction"),
        ("get_image_embedding", r"set with .set_image\(...\) to generate an embedding"),
        ("predict_batch", r"set with .set_image_batch\(...\) before mask prediction"),
    ],
)
def test_prediction_before_set_image(model, call: str, message: str) -> None:
    """A SeganyError, and the RuntimeError that Meta's predictor raises."""
    with pytest.raises(RuntimeError, match=message) as error:
        getattr(unset_predictor(model), call)()
    assert isinstance(error.value, ImageNotSetError)
    one_line_error(error)


BAD_PROMPTS = {
    "labels count": (
        {"point_coords": np.array([[10.0, 10.0], [20.0, 20.0]]), "point_labels": np.array([1])},
        "2 points but 1 labels",
    ),
    "batched labels count": (
        {"point_coords": np.zeros((2, 3, 2)), "point_labels": np.ones((2, 2))},
        "3 points but 2 labels",
    ),
    "labels without points": ({"point_labels": np.array([1])}, "given together"),
    "points shape": (
        {"point_coords": np.zeros((2, 3)), "point_labels": np.ones(2)},
        r"shape \(N, 2\) or \(B, N, 2\)",
    ),
    "label value": (
        {"point_coords": np.array([[10.0, 10.0]]), "point_labels": np.array([5])},
        "label 5 is not allowed",
    ),
    "point outside": (
        {"point_coords": np.array([[1300.0, 10.0]]), "point_labels": np.array([1])},
        "outside the 1200x600 image",
    ),
    "pixels not normalized": (
        {
            "point_coords": np.array([[700.0, 250.0]]),
            "point_labels": np.array([1]),
            "normalize_coords": False,
        },
        "normalize_coords=False.*fractions",
    ),
    "mask shape": ({"mask_input": np.zeros((1, 64, 64))}, r"mask_input must have shape"),
    "batched mask shape": ({"mask_input": np.zeros((2, 2, 256, 256))}, "mask_input must"),
    "masks for boxes": (
        {"box": TWO_BOXES, "mask_input": np.zeros((3, 1, 256, 256))},
        "3 mask inputs for 2 prompt sets",
    ),
    "point sets for boxes": (
        {**PROMPTS["two objects"], "box": np.stack([BOX, BOX, BOX])},
        "2 point sets but 3 boxes",
    ),
    "box order": ({"box": np.array([500.0, 10.0, 100.0, 90.0])}, "x1 < x0"),
    "not a number": (
        {"point_coords": np.array([[np.nan, 1.0]]), "point_labels": np.array([1])},
        "NaN",
    ),
}


@pytest.mark.parametrize("case", BAD_PROMPTS)
def test_bad_prompts_raise_one_line(predictor, case: str) -> None:
    kwargs, message = BAD_PROMPTS[case]
    with pytest.raises(SeganyError, match=message) as error:
        predictor.predict(**kwargs)
    one_line_error(error)


def test_bad_images_and_calls_raise_one_line(model, predictor, batch_predictor) -> None:
    empty = unset_predictor(model)
    cases = [
        (lambda: empty.set_image(np.zeros((10, 10, 3), np.float32)), "uint8"),
        (lambda: empty.set_image(np.zeros((10, 10), np.uint8)), r"\(H, W, 3\)"),
        (lambda: empty.set_image_batch([]), "at least one image"),
        (lambda: empty.set_image_batch(np.zeros((1, 10, 10, 3), np.uint8)), "list of images"),
        (lambda: batch_predictor.predict(**PROMPTS["click"]), "use predict_batch"),
        (lambda: batch_predictor.predict_batch(box_batch=[BOX]), "1 prompts given for 2"),
        (lambda: predictor._predict(None, None, img_idx=3), "img_idx 3 is out of range"),
        (lambda: Sam2ImagePredictor(model, max_hole_area=10), "not supported yet"),
        (lambda: Sam2ImagePredictor(torch.nn.Linear(1, 1)), "takes a SAM 2 model"),
        (lambda: Sam2ImagePredictor(model, precision="fp8"), "unknown precision"),
    ]
    for call, message in cases:
        with pytest.raises(SeganyError, match=message) as error:
            call()
        one_line_error(error)
    assert not empty._is_image_set  # a bad image leaves the predictor as it was
    with pytest.raises(SeganyError, match="expects") as error:
        empty._features = {"image_embed": torch.zeros(1, 256, 32, 32), "high_res_feats": []}
    one_line_error(error)


def test_public_name() -> None:
    assert segany.Sam2ImagePredictor is Sam2ImagePredictor
    assert "Sam2ImagePredictor" in segany.__all__

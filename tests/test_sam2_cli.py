"""The command line with SAM 2 models: ``segany segment``, ``eval`` and ``everything``
against Meta's ``SAM2ImagePredictor`` and ``SAM2AutomaticMaskGenerator`` on the same
weights.

The commands load the model by name (``--model sam2.1_t``), which gives them the small
model here: Meta's ``sam2.1_hiera_t`` at a 256 px input, random weights (a full-size run
of every command would take minutes on a CPU; the full-size model is proven exact in
test_sam2_image.py and test_sam2_predictor.py, and reading Meta's checkpoint files in
test_sam2_loading.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2_reference import meta_sam2, photo, segany_sam2

from segany.cli import main
from segany.commands import common

# A few pixels may sit within the 1e-4 of the two libraries' logits from the threshold.
MAX_DIFFERENT_PIXELS = 0.0005


INPUT_SIZE = 256


@pytest.fixture(scope="module")
def meta_model():
    return meta_sam2(INPUT_SIZE)


@pytest.fixture(autouse=True)
def small_sam2(meta_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--model sam2.1_t`` loads segany's model with ``meta_model``'s weights."""
    model = segany_sam2(meta_model)
    real = common.load_model
    monkeypatch.setattr(
        common, "load_model", lambda name, *args: model if name == "sam2.1_t" else real(name, *args)
    )


MODEL = ["--model", "sam2.1_t", "--device", "cpu", "--precision", "fp32"]


def meta_predictor(meta_model) -> SAM2ImagePredictor:
    predictor = SAM2ImagePredictor(meta_model)
    # Meta's predictor writes the feature grids of a 1024 px input in its code.
    grid = INPUT_SIZE // 16
    predictor._bb_feat_sizes = [(4 * grid, 4 * grid), (2 * grid, 2 * grid), (grid, grid)]
    return predictor


def meta_mask(meta_model, image: np.ndarray, **prompt) -> np.ndarray:
    predictor = meta_predictor(meta_model)
    predictor.set_image(image)
    with torch.no_grad():
        masks, _, _ = predictor.predict(**prompt, multimask_output=False)
    return masks[0] > 0


def assert_same_mask(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.shape == expected.shape
    assert expected.any() and not expected.all()  # a real test: the mask is not trivial
    assert np.mean(ours != expected) <= MAX_DIFFERENT_PIXELS


def test_segment(meta_model, tmp_path) -> None:
    image = photo(300, 500)
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "mask.png"
    argv = ["segment", str(tmp_path / "photo.png"), *MODEL]
    argv += ["--point", "350,120", "--box", "150,40,480,260", "-o", str(out)]
    assert main(argv) == 0
    expected = meta_mask(
        meta_model,
        image,
        point_coords=np.array([[350.0, 120.0]]),
        point_labels=np.array([1]),
        box=np.array([150.0, 40.0, 480.0, 260.0]),
    )
    assert_same_mask(np.asarray(Image.open(out)) > 0, expected)


def test_eval(meta_model, tmp_path, capsys) -> None:
    """The box prompt's IoU is that of Meta's mask for the object's tight box."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = photo(120, 160, seed=3)
    gt = np.zeros((120, 160), bool)
    gt[30:90, 40:130] = True
    Image.fromarray(image).save(root / "images" / "one.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(root / "masks" / "one__thing.png")
    argv = ["eval", "--data", str(root), "--prompt", "box", "--json", *MODEL]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    mask = meta_mask(meta_model, image, box=np.array([40.0, 30.0, 129.0, 89.0]))
    expected = np.count_nonzero(mask & gt) / np.count_nonzero(mask | gt)
    assert summary["miou_box"] == pytest.approx(expected, abs=0.002)


def test_everything(meta_model, tmp_path, capsys) -> None:
    """SAM 2's generator with SAM 2's options (--use-m2m): Meta's masks and scores."""
    image = photo(200, 300, seed=5)
    Image.fromarray(image).save(tmp_path / "photo.png")
    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    argv = ["everything", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out")]
    assert main([*argv, *flags, "--use-m2m", *MODEL]) == 0
    document = json.loads((tmp_path / "out" / "photo.json").read_text())
    ours = sorted(a["predicted_iou"] for a in document["annotations"])
    with torch.no_grad():
        generator = SAM2AutomaticMaskGenerator(meta_model, use_m2m=True, **options)
        generator.predictor = meta_predictor(meta_model)
        records = generator.generate(image)
    assert len(ours) == len(records) > 0
    expected = sorted(float(r["predicted_iou"]) for r in records)
    assert ours == pytest.approx(expected, abs=1e-4)


def test_sam2_options_are_refused_for_sam(tmp_path, capsys) -> None:
    Image.fromarray(photo(40, 60)).save(tmp_path / "photo.png")
    argv = ["everything", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--use-m2m"]
    assert main([*argv, "--model", "default"]) == 2
    assert "--use-m2m is not an option of SAM's mask generator" in capsys.readouterr().err


def test_engine_auto_in_process(meta_model, tmp_path, monkeypatch) -> None:
    """The data engine's workers run SAM 2's generator, with SAM 2's options."""
    from segany import loading

    model = segany_sam2(meta_model)
    monkeypatch.setattr(loading, "load_model", lambda *args: model)
    image = photo(200, 300, seed=5)
    Image.fromarray(image).save(tmp_path / "photo.png")
    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    argv = ["engine", "auto", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out")]
    assert main([*argv, "--in-process", *flags, "--no-multimask-output", *MODEL]) == 0
    document = json.loads((tmp_path / "out" / "photo.json").read_text())
    ours = sorted(a["predicted_iou"] for a in document["annotations"])
    generator = SAM2AutomaticMaskGenerator(meta_model, multimask_output=False, **options)
    generator.predictor = meta_predictor(meta_model)
    with torch.no_grad():
        expected = sorted(float(r["predicted_iou"]) for r in generator.generate(image))
    assert len(ours) == len(expected) > 0
    assert ours == pytest.approx(expected, abs=1e-4)

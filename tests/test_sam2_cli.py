"""The command line with SAM 2 models: ``segany segment`` and ``segany eval`` on a file
in Meta's checkpoint format, against Meta's ``SAM2ImagePredictor`` on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2_reference import meta_sam2, photo

from segany.cli import main

# A few pixels may sit within the 1e-4 of the two libraries' logits from the threshold.
MAX_DIFFERENT_PIXELS = 0.0005


@pytest.fixture(scope="module")
def meta_model():
    return meta_sam2()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, meta_model) -> Path:
    path = tmp_path_factory.mktemp("meta") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": meta_model.state_dict()}, path)
    return path


def meta_mask(meta_model, image: np.ndarray, **prompt) -> np.ndarray:
    predictor = SAM2ImagePredictor(meta_model)
    predictor.set_image(image)
    with torch.no_grad():
        masks, _, _ = predictor.predict(**prompt, multimask_output=False)
    return masks[0] > 0


def assert_same_mask(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.shape == expected.shape
    assert expected.any() and not expected.all()  # a real test: the mask is not trivial
    assert np.mean(ours != expected) <= MAX_DIFFERENT_PIXELS


def test_segment_with_a_meta_checkpoint(meta_model, checkpoint, tmp_path) -> None:
    image = photo(300, 500)
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "mask.png"
    argv = ["segment", str(tmp_path / "photo.png"), "--checkpoint", str(checkpoint)]
    argv += ["--point", "350,120", "--box", "150,40,480,260", "-o", str(out)]
    assert main([*argv, "--device", "cpu", "--precision", "fp32"]) == 0
    expected = meta_mask(
        meta_model,
        image,
        point_coords=np.array([[350.0, 120.0]]),
        point_labels=np.array([1]),
        box=np.array([150.0, 40.0, 480.0, 260.0]),
    )
    assert_same_mask(np.asarray(Image.open(out)) > 0, expected)


def test_eval_with_a_sam2_model(meta_model, checkpoint, tmp_path, capsys) -> None:
    """The box prompt's IoU is that of Meta's mask for the object's tight box."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = photo(120, 160, seed=3)
    gt = np.zeros((120, 160), bool)
    gt[30:90, 40:130] = True
    Image.fromarray(image).save(root / "images" / "one.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(root / "masks" / "one__thing.png")
    argv = ["eval", "--data", str(root), "--prompt", "box", "--json", "--checkpoint"]
    assert main([*argv, str(checkpoint), "--device", "cpu", "--precision", "fp32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    mask = meta_mask(meta_model, image, box=np.array([40.0, 30.0, 129.0, 89.0]))
    expected = np.count_nonzero(mask & gt) / np.count_nonzero(mask | gt)
    assert summary["miou_box"] == pytest.approx(expected, abs=0.002)

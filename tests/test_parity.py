"""segany against the reference implementations with identical random weights.

References: the official ``segment-anything`` 1.0 package (ViT models), MobileSAM's code
(``mobilesam-mirror``, ``vit_t``) and Hugging Face ``transformers`` (converted checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import TINY_CONFIG, build_official, make_model_pair, randomize_

from segany import SamPredictor, build_sam, sam_model_registry
from segany.build import build_sam_from_config

ATOL = 1e-4


def _real_image(shared_data: Path) -> np.ndarray:
    path = sorted((shared_data / "coco-mval" / "images").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


def _reference_predictor(reference: torch.nn.Module):
    if type(reference).__module__.startswith("mobile_sam"):
        from mobile_sam import SamPredictor as ReferencePredictor
    else:
        from segment_anything import SamPredictor as ReferencePredictor
    return ReferencePredictor(reference)


def _assert_same_prediction(ours: tuple, theirs: tuple) -> None:
    """Logit outputs agree to ATOL; binary masks agree wherever the logit is not ~0."""
    logits, scores, low_res = ours
    ref_logits, ref_scores, ref_low_res = theirs
    np.testing.assert_allclose(scores, ref_scores, atol=ATOL, rtol=0)
    np.testing.assert_allclose(low_res, ref_low_res, atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
    decided = np.abs(ref_logits) > 1e-3
    assert np.array_equal((logits > 0)[decided], (ref_logits > 0)[decided])


def _prompt_cases(height: int, width: int) -> dict[str, dict]:
    points = np.array(
        [[0.3 * width, 0.4 * height], [0.7 * width, 0.6 * height], [0.5 * width, 0.2 * height]]
    )
    box = np.array([0.1 * width, 0.2 * height, 0.8 * width, 0.9 * height])
    return {
        "one point": {"point_coords": points[:1], "point_labels": np.array([1])},
        "points": {"point_coords": points, "point_labels": np.array([1, 0, 1])},
        "box": {"box": box},
        "points and box": {
            "point_coords": points[:2],
            "point_labels": np.array([1, 0]),
            "box": box,
        },
    }


@pytest.fixture(scope="module", params=["tiny", "vit_b", "vit_t"])
def predictor_pair(request, shared_data: Path, tmp_path_factory):
    """Predictors on the same real image, segany vs reference."""
    name = request.param
    ours, reference = make_model_pair(name, seed=3)
    if name == "vit_b":
        # The official checkpoint path: a saved state dict through the registry.
        path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
        torch.save(reference.state_dict(), path)
        ours = sam_model_registry["vit_b"](checkpoint=path)
    image = _real_image(shared_data)
    # fp32: the official numbers (the default precision may be faster and approximate).
    predictor = SamPredictor(ours, precision="fp32")
    reference_predictor = _reference_predictor(reference)
    predictor.set_image(image)
    reference_predictor.set_image(image)
    return name, predictor, reference_predictor, image


def test_image_embedding_matches(predictor_pair) -> None:
    _, predictor, reference_predictor, _ = predictor_pair
    ours = predictor.get_image_embedding()
    theirs = reference_predictor.get_image_embedding()
    assert ours.shape == theirs.shape == (1, 256, 64, 64)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    assert predictor.input_size == reference_predictor.input_size
    assert predictor.original_size == reference_predictor.original_size


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", ["one point", "points", "box", "points and box"])
def test_predict_matches(predictor_pair, case: str, multimask: bool) -> None:
    _, predictor, reference_predictor, image = predictor_pair
    prompt = _prompt_cases(*image.shape[:2])[case]
    ours = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
    theirs = reference_predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
    assert ours[0].shape == theirs[0].shape
    _assert_same_prediction(ours, theirs)
    masks, _, _ = predictor.predict(**prompt, multimask_output=multimask)
    assert masks.dtype == bool and masks.shape == theirs[0].shape


def test_mask_prompt_matches(predictor_pair) -> None:
    """A previous low-res output fed back as the mask prompt, alone and with points."""
    _, predictor, reference_predictor, image = predictor_pair
    prompt = _prompt_cases(*image.shape[:2])["points"]
    _, scores, low_res = reference_predictor.predict(**prompt)
    mask_input = low_res[np.argmax(scores)][None]
    for extra in ({}, prompt):
        ours = predictor.predict(
            **extra, mask_input=mask_input, multimask_output=False, return_logits=True
        )
        theirs = reference_predictor.predict(
            **extra, mask_input=mask_input, multimask_output=False, return_logits=True
        )
        _assert_same_prediction(ours, theirs)


def test_predict_torch_many_boxes_matches(predictor_pair) -> None:
    _, predictor, reference_predictor, image = predictor_pair
    height, width = image.shape[:2]
    boxes = torch.tensor(
        [
            [10, 20, width / 2, height / 2],
            [width / 3, height / 4, width - 5, height - 5],
            [0, 0, width, height],
        ],
        dtype=torch.float,
    )
    ours = predictor.predict_torch(
        None, None, predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
    )
    theirs = reference_predictor.predict_torch(
        None, None, reference_predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
    )
    torch.testing.assert_close(ours[1], theirs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[2], theirs[2], atol=ATOL, rtol=0)
    assert ours[0].shape == theirs[0].shape == (3, 3, height, width)


def test_padded_prompt_sets_match_official_padding(predictor_pair) -> None:
    """Sets of 1 and 3 points in one call equal the reference on the same padded tensors."""
    _, predictor, reference_predictor, image = predictor_pair
    size = image.shape[:2]
    cases = _prompt_cases(*size)
    coords = [cases["one point"]["point_coords"], cases["points"]["point_coords"]]
    labels = [cases["one point"]["point_labels"], cases["points"]["point_labels"]]
    masks, scores, low_res = predictor.predict_prompts(coords, labels, return_logits=True)
    assert masks.shape == (2, 3, *size)

    padded = np.zeros((2, 3, 2))
    padded_labels = np.full((2, 3), -1)
    for row, (c, lab) in enumerate(zip(coords, labels)):
        padded[row, : len(c)], padded_labels[row, : len(lab)] = c, lab
    transformed = reference_predictor.transform.apply_coords(padded, size)
    theirs = reference_predictor.predict_torch(
        torch.as_tensor(transformed, dtype=torch.float),
        torch.as_tensor(padded_labels, dtype=torch.int),
        return_logits=True,
    )
    np.testing.assert_allclose(scores, theirs[1].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(low_res, theirs[2].numpy(), atol=ATOL, rtol=0)
    # The full set has no padding, so it equals a plain predict call.
    single = reference_predictor.predict(**cases["points"], return_logits=True)
    np.testing.assert_allclose(scores[1], single[1], atol=ATOL, rtol=0)


def test_sam_forward_matches(shared_data: Path) -> None:
    """The official batched ``Sam.forward`` API."""
    ours, reference = make_model_pair("tiny", seed=5)
    image = _real_image(shared_data)
    predictor = SamPredictor(ours)
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1).float()
    boxes = predictor.transform.apply_boxes_torch(
        torch.tensor([[30.0, 40.0, 300.0, 200.0]]), image.shape[:2]
    )
    batch = [{"image": resized, "original_size": image.shape[:2], "boxes": boxes}]
    ours_out = ours(batch, multimask_output=True)[0]
    theirs_out = reference(batch, multimask_output=True)[0]
    for key in ("iou_predictions", "low_res_logits"):
        torch.testing.assert_close(ours_out[key], theirs_out[key], atol=ATOL, rtol=0)
    assert ours_out["masks"].shape == theirs_out["masks"].shape


def _import_transformers_sam():
    """transformers would take the torchvision stand-in for the real package: hide it."""
    import sys

    standins = [p for p in sys.path if p.endswith("standins")]
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "torchvision"}
    for path in standins:
        sys.path.remove(path)
    try:
        import transformers.image_utils  # noqa: F401
        from transformers import SamConfig, SamModel
    finally:
        sys.path[:0] = standins
        sys.modules.update(hidden)
    return SamConfig, SamModel


def test_hugging_face_checkpoint_converts(tmp_path: Path) -> None:
    """A transformers SamModel saved as safetensors loads into segany with the same outputs."""
    HFSamConfig, SamModel = _import_transformers_sam()
    encoder = TINY_CONFIG.encoder
    hf_config = HFSamConfig(
        vision_config={
            "hidden_size": encoder.embed_dim,
            "num_hidden_layers": encoder.depth,
            "num_attention_heads": encoder.num_heads,
            "global_attn_indexes": list(encoder.global_attn_indexes),
            "window_size": encoder.window_size,
            "mlp_dim": int(encoder.embed_dim * encoder.mlp_ratio),
            "output_channels": 256,
        }
    )
    torch.manual_seed(0)
    hf_model = randomize_(SamModel(hf_config).eval(), seed=7)
    hf_model.save_pretrained(tmp_path)
    ours = build_sam(TINY_CONFIG, checkpoint=tmp_path / "model.safetensors")

    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        embedding = ours.image_encoder(image)
        hf_embedding = hf_model.get_image_embeddings(image)
        torch.testing.assert_close(embedding, hf_embedding, atol=ATOL, rtol=1e-5)
        points = torch.tensor([[[[120.0, 230.0], [600.0, 410.0]]]])
        labels = torch.tensor([[[1, 0]]])
        boxes = torch.tensor([[[100.0, 200.0, 700.0, 650.0]]])
        for prompt in ({"input_points": points, "input_labels": labels}, {"input_boxes": boxes}):
            hf_out = hf_model(image_embeddings=hf_embedding, multimask_output=True, **prompt)
            sparse, dense = ours.prompt_encoder(
                points=(points[0], labels[0]) if "input_points" in prompt else None,
                boxes=boxes[0] if "input_boxes" in prompt else None,
                masks=None,
            )
            low_res, iou = ours.mask_decoder(
                embedding, ours.prompt_encoder.get_dense_pe(), sparse, dense, True
            )
            torch.testing.assert_close(low_res, hf_out.pred_masks[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(iou, hf_out.iou_scores[0], atol=ATOL, rtol=0)


def test_official_state_dict_loads_through_file(tmp_path: Path) -> None:
    """A state dict saved by the official model loads with weights_only and gives equal weights."""
    reference = randomize_(build_official(TINY_CONFIG), seed=11)
    path = tmp_path / "custom.pth"
    torch.save(reference.state_dict(), path)
    ours = build_sam(TINY_CONFIG, checkpoint=path)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=0, rtol=0)


def test_random_init_is_not_the_reference() -> None:
    """Guards the tests above: different seeds give different weights and outputs."""
    a = build_sam_from_config(TINY_CONFIG)
    b = randomize_(build_sam_from_config(TINY_CONFIG), seed=1)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        assert (a.image_encoder(x) - b.image_encoder(x)).abs().max() > 1e-2

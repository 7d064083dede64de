"""segany's ``Sam2AutomaticMaskGenerator`` against Meta's ``SAM2AutomaticMaskGenerator``
(``sam2`` 1.1.0).

Both run the same random ``sam2.1_hiera_t`` weights (tests/sam2_reference.py, logits
sharpened) built for a 256-pixel input, so that a decode costs a sixteenth of one at
1024 px. Both predictors' ``set_image`` are given the same features, made from the crop's
pixels (:func:`crop_features`): the encoders are held to each other in
tests/test_sam2_image.py and tests/test_sam2_predictor.py; here the generators are (grid,
coordinates, decode, m2m, upscaling, filters, NMS, crops, clean-up, records). Random
decoders score masks low, so the thresholds are loosened until tens of masks pass.

Records must come in Meta's order, with the same point, crop box and box, masks equal up
to a few boundary pixels, and scores within 1e-4.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import randomize_
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2_reference import LOGIT_SCALE, NAME, yaml_path
from scipy import ndimage

import segany
from segany import SeganyError
from segany.amg_options import AMG_OPTIONS, Sam2AmgOptions
from segany.masks import coco_to_mask, remove_small_logit_regions, rle_to_mask
from segany.modeling.sam2 import SAM2_CONFIGS, Sam2
from segany.sam2_automatic_mask_generator import Sam2AutomaticMaskGenerator

INPUT_SIZE = 256  # model input side: a 16 x 16 embedding, 64 x 64 low-res masks
GRID = INPUT_SIZE // 16
TOLERANCE = 1e-4
# Pixels in which a mask may differ from Meta's (logits within float rounding of the
# threshold).
MAX_PIXELS_OFF = 4
# Random decoders predict IoU ~0.45-0.57; about half the masks pass these.
LOOSE = {"points_per_side": 6, "pred_iou_thresh": 0.47, "stability_score_thresh": 0.9}


@pytest.fixture(scope="module")
def meta_model() -> SAM2Base:
    """Meta's model as tests/sam2_reference.py's ``meta_sam2``, for a 256-pixel input."""
    torch.manual_seed(0)
    overrides = [f"++model.image_size={INPUT_SIZE}"]
    model = build_sam2(yaml_path(NAME), None, device="cpu", hydra_overrides_extra=overrides)
    model = randomize_(model, seed=0)
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(LOGIT_SCALE)
    return model.eval()


@pytest.fixture(scope="module")
def model(meta_model: SAM2Base) -> Sam2:
    config = dataclasses.replace(SAM2_CONFIGS[NAME], image_size=INPUT_SIZE)
    ours = Sam2.from_config(config).eval()
    ours.load_official_state_dict(meta_model.state_dict())
    return ours


def spots(height: int = 150, width: int = 200) -> np.ndarray:
    """A dark picture with four coloured disks, one inside each first-layer crop, so that
    some masks from crops stay clear of the crops' inner edges."""
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 40, np.uint8)
    ys, xs = np.mgrid[:height, :width]
    for cy, cx in [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)]:
        disk = (ys - cy * height) ** 2 + (xs - cx * width) ** 2 < (0.08 * height) ** 2
        image[disk] = rng.uniform(80, 255, 3)
    return image


def crop_features(crop: np.ndarray) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Features of a crop as SAM 2's predictors keep them (``image_embed`` and
    ``high_res_feats``): the crop's colours resized to each level and mixed into its
    channels, plus a little fixed noise; the fine levels weigh most, so masks follow the
    disks."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.as_tensor(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
    levels = []
    for channels, side, weight in ((32, 4 * GRID, 1.0), (64, 2 * GRID, 1.0), (256, GRID, 0.1)):
        noise = torch.randn((1, channels, side, side), generator=generator)
        mix = torch.randn((channels, 3), generator=generator)
        picture = F.interpolate(pixels, (side, side), mode="bilinear", align_corners=False)
        colours = torch.einsum("ck,bkhw->bchw", mix, picture - 0.5)
        levels.append(weight * (0.1 * noise + 4 * colours))
    return {"image_embed": levels[2], "high_res_feats": levels[:2]}


def with_crop_features(generator: SAM2AutomaticMaskGenerator | Sam2AutomaticMaskGenerator):
    """``generator`` with its predictor's ``set_image`` giving :func:`crop_features`, as
    code that caches features assigns them (both predictors take that)."""
    predictor = generator.predictor

    def set_image(image: np.ndarray) -> None:
        predictor.reset_predictor()
        predictor._features = crop_features(image)
        predictor._orig_hw = [tuple(image.shape[:2])]
        predictor._is_image_set = True

    predictor.set_image = set_image
    return generator


def meta_connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for Meta's CUDA ``get_connected_components`` (sam2/csrc): 8-connected
    regions of (N, 1, H, W) masks -> per-pixel labels (0 outside) and region areas."""
    labels, areas = (
        torch.zeros(mask.shape, dtype=torch.int32),
        torch.zeros_like(mask, dtype=torch.int32),
    )
    for index, plane in enumerate(mask[:, 0].numpy()):
        label, _ = ndimage.label(plane, structure=np.ones((3, 3)))
        sizes = np.bincount(label.ravel())
        sizes[0] = 0
        labels[index, 0] = torch.from_numpy(label.astype(np.int32))
        areas[index, 0] = torch.from_numpy(sizes[label].astype(np.int32))
    return labels, areas


def as_mask(segmentation) -> np.ndarray:
    if isinstance(segmentation, np.ndarray):
        return segmentation
    if isinstance(segmentation["counts"], list):
        return rle_to_mask(segmentation)
    return coco_to_mask(segmentation)


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """Meta's records, in its order: points, crop boxes and boxes equal, masks within
    :data:`MAX_PIXELS_OFF` pixels, scores within :data:`TOLERANCE`."""
    assert len(got) == len(expected)
    for index, (ours, meta) in enumerate(zip(got, expected, strict=True)):
        where = f"record {index}"
        assert ours.keys() == meta.keys(), where
        assert ours["point_coords"] == meta["point_coords"], where
        assert ours["crop_box"] == meta["crop_box"], where
        assert ours["bbox"] == meta["bbox"], where
        assert abs(ours["predicted_iou"] - meta["predicted_iou"]) <= TOLERANCE, where
        # Stability is a ratio of pixel counts at two thresholds: a pixel whose logit lies
        # within rounding of one (as MAX_PIXELS_OFF allows) moves it by 1 / its area.
        stability_off = TOLERANCE + MAX_PIXELS_OFF / max(meta["area"], 1)
        assert abs(ours["stability_score"] - meta["stability_score"]) <= stability_off, where
        assert type(ours["segmentation"]) is type(meta["segmentation"]), where
        ours_mask, meta_mask = as_mask(ours["segmentation"]), as_mask(meta["segmentation"])
        assert ours_mask.shape == meta_mask.shape, where
        assert int((ours_mask != meta_mask).sum()) <= MAX_PIXELS_OFF, where
        assert abs(ours["area"] - meta["area"]) <= MAX_PIXELS_OFF, where


def run_both(
    meta_model: SAM2Base, model: Sam2, image: np.ndarray, **options
) -> tuple[list[dict], list[dict]]:
    meta = with_crop_features(SAM2AutomaticMaskGenerator(meta_model, **options))
    ours = with_crop_features(Sam2AutomaticMaskGenerator(model, precision="fp32", **options))
    return ours.generate(image), meta.generate(image)


CASES = {
    "loosened defaults": ({**LOOSE}, 2),
    "use_m2m": ({**LOOSE, "use_m2m": True, "box_nms_thresh": 1.0}, 20),
    "one mask per point, coco_rle": (
        {**LOOSE, "multimask_output": False, "box_nms_thresh": 1.0, "output_mode": "coco_rle"},
        10,
    ),
    "crop layer": (
        {
            **LOOSE,
            "crop_n_layers": 1,
            "crop_n_points_downscale_factor": 2,
            "box_nms_thresh": 0.9,
            "output_mode": "uncompressed_rle",
        },
        3,  # the cross-crop NMS keeps two of the image's masks and one of a crop's
    ),
    "mask_threshold and offset": (
        {**LOOSE, "mask_threshold": 1.5, "stability_score_offset": 0.5, "box_nms_thresh": 1.0},
        10,
    ),
}


@pytest.mark.parametrize("options,least", CASES.values(), ids=CASES.keys())
def test_records_match_meta(meta_model: SAM2Base, model: Sam2, options: dict, least: int) -> None:
    got, expected = run_both(meta_model, model, spots(), **options)
    assert len(expected) >= least, "the loosened thresholds should leave masks to compare"
    if options.get("crop_n_layers"):
        assert {tuple(r["crop_box"]) for r in expected} != {(0, 0, 200, 150)}, "crop masks"
    assert_same_records(got, expected)


def test_min_mask_region_area_matches_meta(
    meta_model: SAM2Base, model: Sam2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Meta's generator cleans the low-res logits with its image predictor's
    max_hole_area and max_sprinkle_area (a CUDA kernel finds the regions; stood in for
    here), not with SAM's post-processing of the final masks."""
    import sam2.utils.misc

    small_regions = []

    def components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, areas = meta_connected_components(mask)
        small_regions.append(int(((areas > 0) & (areas <= 12)).sum()))
        return labels, areas

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", components)
    options = {**LOOSE, "min_mask_region_area": 12, "box_nms_thresh": 1.0}
    got, expected = run_both(meta_model, model, spots(), **options)
    assert sum(small_regions) > 0, "some regions should be cleaned"
    assert len(expected) >= 10
    assert_same_records(got, expected)


def test_logit_clean_up_is_meta_predictor_postprocessing() -> None:
    """:func:`remove_small_logit_regions` against Meta's ``postprocess_masks`` (with the
    stand-in for its kernel) on random logits, before the resize."""
    import sam2.utils.misc
    from sam2.utils.transforms import SAM2Transforms

    logits = torch.randn((6, 1, 32, 32), generator=torch.Generator().manual_seed(3)) * 4
    transforms = SAM2Transforms(32, 0.0, max_hole_area=5, max_sprinkle_area=5)
    original = sam2.utils.misc.get_connected_components
    sam2.utils.misc.get_connected_components = meta_connected_components
    try:
        expected = transforms.postprocess_masks(logits, (32, 32))  # same size: no resize
    finally:
        sam2.utils.misc.get_connected_components = original
    got = remove_small_logit_regions(logits[:, 0], 5)[:, None]
    assert not torch.equal(got, logits)
    assert torch.equal(got, expected)


# -------------------------------------------------------------------------------------
# Options, construction and errors
# -------------------------------------------------------------------------------------


def test_options_are_metas_signature(model: Sam2) -> None:
    """Sam2AmgOptions holds Meta's options with its defaults, in its order; the generator
    keeps that signature (less Meta's ignored **kwargs) and adds precision and compile."""
    meta = inspect.signature(SAM2AutomaticMaskGenerator).parameters
    ours = inspect.signature(Sam2AutomaticMaskGenerator).parameters
    meta_names = [name for name in meta if name != "kwargs"]
    assert list(ours) == [*meta_names, "precision", "compile"]
    specs = Sam2AmgOptions.specs()
    assert [spec.name for spec in specs] == meta_names[1:]  # less the model
    for spec in specs:
        assert spec.default == meta[spec.name].default == ours[spec.name].default, spec.name
    assert AMG_OPTIONS["sam2"] is Sam2AmgOptions
    generator = Sam2AutomaticMaskGenerator(model, points_per_side=4, use_m2m=True)
    assert generator.options == Sam2AmgOptions(points_per_side=4, use_m2m=True)
    assert (generator.use_m2m, generator.multimask_output, generator.pred_iou_thresh) == (
        True,
        True,
        0.8,
    )
    assert segany.Sam2AutomaticMaskGenerator is Sam2AutomaticMaskGenerator


@pytest.mark.parametrize(
    "options,message",
    [
        ({"use_m2m": "yes"}, "use_m2m must be True or False"),
        ({"multimask_output": 1}, "multimask_output must be True or False"),
        ({"mask_threshold": float("nan")}, "mask_threshold must be a number"),
        ({"pred_iou_thresh": 1.5}, "pred_iou_thresh must be a number between 0 and 1"),
        ({"output_mode": "png"}, "output_mode must be one of"),
        ({"points_per_side": None}, "exactly one of points_per_side and point_grids"),
        ({"min_mask_region_area": -1}, "min_mask_region_area"),
    ],
)
def test_bad_options_raise_segany_error(model: Sam2, options: dict, message: str) -> None:
    with pytest.raises(SeganyError, match=message) as error:
        Sam2AutomaticMaskGenerator(model, **options)
    assert "\n" not in str(error.value)


def test_sam_model_and_bad_image_raise_segany_error(model: Sam2) -> None:
    with pytest.raises(SeganyError, match="takes a SAM 2 model"):
        Sam2AutomaticMaskGenerator(torch.nn.Linear(1, 1))
    generator = Sam2AutomaticMaskGenerator(model, points_per_side=2)
    with pytest.raises(SeganyError, match="must be uint8"):
        generator.generate(np.zeros((10, 10, 3), np.float32))


def test_from_pretrained(model: Sam2, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads through Sam2ImagePredictor.from_pretrained (here without a download); the
    options are checked before anything loads."""
    loads = []

    def load_model(name: str, device: str | None = None) -> Sam2:
        loads.append((name, device))
        return model

    monkeypatch.setattr(segany.sam2_predictor, "load_model", load_model)
    with pytest.raises(SeganyError, match="pred_iou_thresh"):
        Sam2AutomaticMaskGenerator.from_pretrained("facebook/sam2.1-hiera-tiny", pred_iou_thresh=2)
    with pytest.raises(SeganyError, match="not a SAM 2 model"):
        Sam2AutomaticMaskGenerator.from_pretrained("vit_b")
    assert loads == []
    generator = Sam2AutomaticMaskGenerator.from_pretrained(
        "facebook/sam2.1-hiera-tiny", device="cpu", points_per_side=4, precision="fp32"
    )
    assert loads == [("sam2.1_t", "cpu")]
    assert generator.model is model
    assert generator.options == Sam2AmgOptions(points_per_side=4)
    assert generator.predictor.precision.name == "fp32"

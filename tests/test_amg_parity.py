"""SamAutomaticMaskGenerator against the official generator.

Three levels:

* a *designed* model (stub encoder/decoder whose masks are blobs around the prompt point,
  with holes, islands and varied scores) shared by both generators: records must be
  identical, in order — this isolates the generator logic (filters, NMS, crops, RLE,
  small-region removal) from model numerics;
* the official package's own prompt encoder and mask decoder (random weights) inside both
  generators: identical again, which checks how point coordinates reach the model;
* segany's model against the official model with identical random weights: the same masks
  and scores up to float rounding of the two implementations.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from reference import build_official, randomize_
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
from segment_anything.modeling import Sam as OfficialSam
from torch import nn

from segany.amg_options import AmgOptions
from segany.automatic_mask_generator import SamAutomaticMaskGenerator, upscale_logits
from segany.build import SamConfig, ViTEncoderConfig, build_sam_from_config
from segany.errors import SeganyError
from segany.inference.mask_decoder import FastMaskDecoder
from segany.masks import rle_to_mask
from segany.modeling import Sam

IMG_SIZE = 256  # model input side: 16x16 embedding, 64x64 low-res masks


class StubImageEncoder(nn.Module):
    """Ignores the image: the designed masks depend on the prompt point only."""

    img_size = IMG_SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], 1, IMG_SIZE // 16, IMG_SIZE // 16))


class StubPromptEncoder(nn.Module):
    """Passes the normalised pixel-centre (x, y) of each point through as its embedding."""

    embed_dim = 2
    image_embedding_size = (IMG_SIZE // 16, IMG_SIZE // 16)
    input_image_size = (IMG_SIZE, IMG_SIZE)
    mask_input_size = (IMG_SIZE // 4, IMG_SIZE // 4)

    def get_dense_pe(self) -> torch.Tensor:
        return torch.zeros((1, 1, *self.image_embedding_size))

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert points is not None and boxes is None and masks is None
        # As SAM's encoder: shift to the pixel centre, then round to float32.
        centres = (points[0] + 0.5).float() / IMG_SIZE
        return centres, torch.zeros((len(centres), 1, *self.image_embedding_size))


class StubMaskDecoder(nn.Module):
    """Three nested blobs around the point, with a fixed rough texture (holes, islands),
    radii, sharpness (so stability) and predicted IoU varying from point to point."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        rough = torch.randn((1, 1, 32, 32), generator=g)
        side = IMG_SIZE // 4
        texture = nn.functional.interpolate(rough, (side, side), mode="bilinear")[0, 0]
        self.register_buffer("texture", texture)
        self.register_buffer("grid", (torch.arange(side, dtype=torch.float32) + 0.5) / side)

    @staticmethod
    def _hash(p: torch.Tensor, salt: float) -> torch.Tensor:
        """Pseudo-random numbers in [0, 1) from (B, 2) points, deterministic."""
        return torch.frac(torch.sin(p[:, 0] * 12.9898 + p[:, 1] * 78.233 + salt) * 43758.5453)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert multimask_output
        p = sparse_prompt_embeddings[:, 0, :]  # (B, 2) in [0, 1]
        dx = self.grid[None, None, :] - p[:, 0, None, None]
        dy = self.grid[None, :, None] - p[:, 1, None, None]
        d2 = dx**2 + dy**2  # (B, side, side)
        logits, ious = [], []
        for k, radius in enumerate((0.06, 0.14, 0.3)):
            r = radius * (0.5 + self._hash(p, k))[:, None, None]
            sharp = (8 + 80 * self._hash(p, 10 + k))[:, None, None]
            logits.append(sharp * (1 - d2 / r**2 + 0.8 * self.texture))
            ious.append(0.75 + 0.25 * self._hash(p, 20 + k))
        return torch.stack(logits, dim=1), torch.stack(ious, dim=1)


def stub_models() -> tuple[Sam, nn.Module]:
    """(segany Sam, official Sam) sharing the designed stub parts."""
    parts = (StubImageEncoder(), StubPromptEncoder(), StubMaskDecoder())
    return Sam(*parts).eval(), OfficialSam(*parts).eval()  # type: ignore[arg-type]


SMALL = SamConfig(
    ViTEncoderConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)),
    img_size=IMG_SIZE,
)


def random_model_pair(seed: int = 0) -> tuple[Sam, nn.Module]:
    """(segany Sam, official Sam) with identical random weights, small and fast."""
    torch.manual_seed(seed)
    ours = randomize_(build_sam_from_config(SMALL), seed).eval()
    official = build_official(SMALL)
    official.load_state_dict(ours.state_dict())
    return ours, official.eval()


def make_image(h: int = 150, w: int = 200, seed: int = 0) -> np.ndarray:
    """A smooth (H, W, 3) uint8 test picture."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 10 + 1, w // 10 + 1, 3))
    return (np.kron(coarse, np.ones((10, 10, 1)))[:h, :w] * 255).astype(np.uint8)


def _comparable(records: list[dict]) -> list[dict]:
    """Records with NaN scores (empty masks) replaced by a marker, as NaN != NaN."""
    return [
        {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
        for r in records
    ]


def _sorted(records: list[dict]) -> list[dict]:
    """Official order is not part of the contract beyond the set; sort to compare."""
    return sorted(records, key=lambda r: (r["crop_box"], r["point_coords"], -r["predicted_iou"]))


STUB_SETTINGS = [
    {},
    {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.9},
    {"crop_n_layers": 1, "pred_iou_thresh": 0.8, "stability_score_thresh": 0.9},
    {"crop_n_layers": 2, "crop_n_points_downscale_factor": 2, "crop_overlap_ratio": 0.25},
    {"min_mask_region_area": 40, "pred_iou_thresh": 0.8, "stability_score_thresh": 0.9},
    {"crop_n_layers": 1, "min_mask_region_area": 25, "box_nms_thresh": 0.5},
    # Post-processing NMS uses max(box, crop) thresholds: here crop's, which keeps more.
    {
        "crop_n_layers": 1,
        "min_mask_region_area": 25,
        "box_nms_thresh": 0.3,
        "crop_nms_thresh": 0.95,
        "pred_iou_thresh": 0.7,
        "stability_score_thresh": 0.7,
    },
    {"stability_score_offset": 3.0, "stability_score_thresh": 0.8, "points_per_batch": 7},
    {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.9},
]


@pytest.mark.parametrize("settings", STUB_SETTINGS, ids=lambda s: ",".join(s) or "defaults")
def test_designed_model_identical_records(settings: dict) -> None:
    ours_model, official_model = stub_models()
    options = {"points_per_side": 12, "output_mode": "uncompressed_rle", **settings}
    image = make_image()
    expected = OfficialGenerator(official_model, **options).generate(image)
    got = SamAutomaticMaskGenerator(ours_model, precision="fp32", **options).generate(image)
    assert len(expected) > 3, "the designed model should leave several masks"
    assert _comparable(got) == _comparable(expected)


@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle"])
def test_designed_model_output_modes(output_mode: str) -> None:
    ours_model, official_model = stub_models()
    options = {"points_per_side": 8, "crop_n_layers": 1, "output_mode": output_mode}
    image = make_image(97, 131)
    expected = OfficialGenerator(official_model, **options).generate(image)
    got = SamAutomaticMaskGenerator(ours_model, precision="fp32", **options).generate(image)
    assert len(got) == len(expected) > 0
    for ours, ref in zip(got, expected, strict=True):
        if output_mode == "binary_mask":
            assert ours["segmentation"].dtype == bool
            np.testing.assert_array_equal(ours.pop("segmentation"), ref.pop("segmentation"))
        assert ours == ref


def test_designed_model_explicit_point_grids() -> None:
    ours_model, official_model = stub_models()
    rng = np.random.default_rng(5)
    grids = [rng.random((40, 2)), rng.random((10, 2))]
    options = {"points_per_side": None, "point_grids": grids, "crop_n_layers": 1,
               "output_mode": "uncompressed_rle"}  # fmt: skip
    image = make_image(120, 90)
    expected = OfficialGenerator(official_model, **options).generate(image)
    assert (
        SamAutomaticMaskGenerator(ours_model, precision="fp32", **options).generate(image)
        == expected
    )


def test_official_decoder_identical_records() -> None:
    """The official prompt encoder and decoder in both generators: every mask kept
    (no thresholds, no suppression), so all scores and masks are compared bit for bit."""
    _, official_model = random_model_pair()
    shell = Sam(
        official_model.image_encoder, official_model.prompt_encoder, official_model.mask_decoder
    ).eval()
    options = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
               "box_nms_thresh": 1.0, "crop_n_layers": 1, "crop_nms_thresh": 1.0,
               "output_mode": "uncompressed_rle"}  # fmt: skip
    image = make_image(110, 170, seed=3)
    expected = OfficialGenerator(official_model, **options).generate(image)
    got = SamAutomaticMaskGenerator(shell, precision="fp32", **options).generate(image)
    assert len(expected) > 100
    assert got == expected


def test_official_decoder_identical_near_float32_steps() -> None:
    """Points whose pixel centre (x + 0.5) crosses a power of two, where rounding x to
    float32 before the shift would differ from the official float64 path."""
    _, official_model = random_model_pair()
    shell = Sam(
        official_model.image_encoder, official_model.prompt_encoder, official_model.mask_decoder
    ).eval()
    rng = np.random.default_rng(7)
    # The image's long side maps to the 256-pixel model input.
    steps = np.array([32.0, 64.0, 128.0])
    model_xy = steps[rng.integers(0, 3, (60, 2))] - rng.random((60, 2)) * 0.5
    grid = model_xy / IMG_SIZE
    options = {"points_per_side": None, "point_grids": [grid], "pred_iou_thresh": 0.0,
               "stability_score_thresh": 0.0, "box_nms_thresh": 1.0,
               "output_mode": "uncompressed_rle"}  # fmt: skip
    image = make_image(170, 170, seed=3)
    expected = OfficialGenerator(official_model, **options).generate(image)
    got = SamAutomaticMaskGenerator(shell, precision="fp32", **options).generate(image)
    assert len(expected) == 180
    assert got == expected


def _mask_iou(a: dict, b: dict) -> float:
    ma, mb = rle_to_mask(a["segmentation"]), rle_to_mask(b["segmentation"])
    union = (ma | mb).sum()
    return float((ma & mb).sum() / union) if union else 1.0


@pytest.mark.parametrize("settings", [{}, {"crop_n_layers": 1}, {"min_mask_region_area": 30}])
def test_segany_model_matches_official_model(settings: dict) -> None:
    """Independent implementations differ by float rounding only: same masks (IoU ~1),
    scores to ~1e-4, boxes to a pixel."""
    ours_model, official_model = random_model_pair(seed=1)
    with torch.no_grad():  # sharper logits, so stability scores are not all ~0
        for model in (ours_model, official_model):
            for mlp in model.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight *= 30
                mlp.layers[-1].bias *= 30
    options = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
               "box_nms_thresh": 1.0, "crop_nms_thresh": 1.0,
               "output_mode": "uncompressed_rle", **settings}  # fmt: skip
    image = make_image(100, 140, seed=4)
    expected = _sorted(OfficialGenerator(official_model, **options).generate(image))
    generator = SamAutomaticMaskGenerator(ours_model, precision="fp32", **options)
    got = _sorted(generator.generate(image))
    assert len(got) == len(expected) > 50
    for ours, ref in zip(got, expected, strict=True):
        assert ours["point_coords"] == ref["point_coords"]
        assert ours["crop_box"] == ref["crop_box"]
        assert ours["predicted_iou"] == pytest.approx(ref["predicted_iou"], abs=1e-4)
        assert ours["stability_score"] == pytest.approx(ref["stability_score"], abs=2e-2)
        assert np.abs(np.subtract(ours["bbox"], ref["bbox"])).max() <= 1
        assert _mask_iou(ours, ref) > 0.98


def test_prompts_failing_the_iou_filter_skip_upscaling(monkeypatch: pytest.MonkeyPatch) -> None:
    """With pred_iou_thresh set, the decoder upscales only the prompts that have a mask
    over it (here about half): the records are still the official generator's."""
    ours_model, official_model = random_model_pair(seed=1)
    with torch.no_grad():
        for model in (ours_model, official_model):
            for mlp in model.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight *= 30
                mlp.layers[-1].bias *= 30
    image = make_image(100, 140, seed=4)
    probe = SamAutomaticMaskGenerator(ours_model, precision="fp32", points_per_side=6)
    probe.predictor.set_image(image)
    grid = probe.point_grids[0] * np.array(image.shape[1::-1])
    with torch.no_grad():
        ious = probe._decode(grid, image.shape[:2])[1]
    # Halfway between two predicted IoUs near the median of the prompts' best ones, so that
    # float rounding (~1e-7 between the implementations) cannot move a mask across it.
    values = ious.flatten().sort().values
    above = int(torch.searchsorted(values, ious.max(dim=1).values.median()))
    threshold = float(values[above - 1] + values[above]) / 2
    wanted_flags: list[bool] = []
    original = FastMaskDecoder._masks

    def spy(self, src, hyper_in, size, wanted=None, *rest):
        wanted_flags.extend(wanted or [])
        return original(self, src, hyper_in, size, wanted, *rest)

    monkeypatch.setattr(FastMaskDecoder, "_masks", spy)
    options = {"points_per_side": 6, "pred_iou_thresh": threshold,
               "stability_score_thresh": 0.0, "box_nms_thresh": 1.0,
               "output_mode": "uncompressed_rle"}  # fmt: skip
    expected = _sorted(OfficialGenerator(official_model, **options).generate(image))
    generator = SamAutomaticMaskGenerator(ours_model, precision="fp32", **options)
    got = _sorted(generator.generate(image))
    assert 0 < wanted_flags.count(False) < len(wanted_flags) == 36
    assert len(got) == len(expected) > 10
    for ours, ref in zip(got, expected, strict=True):
        assert ours["point_coords"] == ref["point_coords"]
        assert ours["predicted_iou"] == pytest.approx(ref["predicted_iou"], abs=1e-4)
        assert _mask_iou(ours, ref) > 0.98


# -------------------------------------------------------------------------------------
# Options and input validation
# -------------------------------------------------------------------------------------


def test_options_are_the_official_signature() -> None:
    """One source: AmgOptions holds the official generator's options with its defaults, in
    its order; segany's generator keeps that signature and adds precision and compile."""
    official = inspect.signature(OfficialGenerator).parameters
    ours = inspect.signature(SamAutomaticMaskGenerator).parameters
    assert list(ours) == [*official, "precision", "compile"]
    specs = AmgOptions.specs()
    assert [spec.name for spec in specs] == list(official)[1:]  # less the model
    for spec in specs:
        assert spec.default == official[spec.name].default == ours[spec.name].default, spec.name
    generator = SamAutomaticMaskGenerator(stub_models()[0], points_per_side=4, crop_n_layers=1)
    assert generator.options == AmgOptions(points_per_side=4, crop_n_layers=1)
    assert [len(grid) for grid in generator.point_grids] == [16, 16]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"points_per_side": None}, "exactly one of points_per_side and point_grids"),
        ({"point_grids": [np.zeros((4, 2))]}, "exactly one of points_per_side and point_grids"),
        ({"output_mode": "png"}, "output_mode must be one of"),
        ({"pred_iou_thresh": 1.5}, "pred_iou_thresh must be a number between 0 and 1"),
        ({"stability_score_thresh": -0.1}, "stability_score_thresh"),
        ({"box_nms_thresh": 2}, "box_nms_thresh"),
        ({"crop_nms_thresh": float("nan")}, "crop_nms_thresh"),
        ({"crop_overlap_ratio": 1.0}, "crop_overlap_ratio"),
        ({"points_per_side": 0}, "points_per_side must be an integer >= 1"),
        ({"points_per_batch": 0}, "points_per_batch"),
        ({"crop_n_layers": -1}, "crop_n_layers"),
        ({"min_mask_region_area": -5}, "min_mask_region_area"),
        (
            {"points_per_side": 4, "crop_n_layers": 3, "crop_n_points_downscale_factor": 2},
            "leaves no points in crop layer 3",
        ),
        (
            {"points_per_side": None, "point_grids": [np.zeros((3, 2))], "crop_n_layers": 1},
            "needs 2, one per layer",
        ),
        ({"points_per_side": None, "point_grids": [np.full((3, 2), 2.0)]}, "normalised"),
    ],
)
def test_bad_options_raise_segany_error(options: dict, message: str) -> None:
    model, _ = stub_models()
    with pytest.raises(SeganyError, match=message):
        SamAutomaticMaskGenerator(model, **options)


@pytest.mark.parametrize(
    "image,message",
    [
        (np.zeros((10, 10), np.uint8), "must be an \\(H, W, 3\\)"),
        (np.zeros((10, 10, 4), np.uint8), "must be an \\(H, W, 3\\)"),
        (np.zeros((10, 10, 3), np.float32), "must be uint8"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        ([[0, 0, 0]], "must be an \\(H, W, 3\\)"),
    ],
)
def test_bad_image_raises_segany_error(image: np.ndarray, message: str) -> None:
    model, _ = stub_models()
    with pytest.raises(SeganyError, match=message):
        SamAutomaticMaskGenerator(model, points_per_side=2).generate(image)


def test_no_masks_gives_empty_list() -> None:
    model, _ = stub_models()
    generator = SamAutomaticMaskGenerator(model, points_per_side=3, pred_iou_thresh=1.0)
    assert generator.generate(make_image(30, 40)) == []
    assert math.isclose(generator.pred_iou_thresh, 1.0)


@pytest.mark.parametrize(
    "input_size,original_size",
    [((768, 1024), (480, 640)), ((1024, 683), (1500, 1000)), ((1024, 1024), (77, 77)),
     ((3, 1024), (5, 1700)), ((1024, 1), (900, 1))],
)  # fmt: skip
def test_upscale_logits_bit_identical_to_official(
    input_size: tuple[int, int], original_size: tuple[int, int]
) -> None:
    _, official_model = random_model_pair()
    official_model.image_encoder.img_size = 1024  # postprocess_masks reads only this
    low_res = torch.randn((3, 2, 256, 256), generator=torch.Generator().manual_seed(9))
    expected = official_model.postprocess_masks(low_res, input_size, original_size)
    got = upscale_logits(low_res, 1024, input_size, original_size)
    assert torch.equal(got, expected)

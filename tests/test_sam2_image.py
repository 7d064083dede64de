"""SAM 2's image model against Meta's ``sam2`` package (1.1.0).

Meta's model and segany's have identical random weights (tests/sam2_reference.py). Image
features, and the masks, scores and low-res logits of Meta's ``SAM2ImagePredictor`` for
every kind of prompt, must agree to 1e-4 in fp32; ``sam2_reference.segany_predict`` writes
out what segany's SAM 2 predictor does (tests/test_sam2_predictor.py holds that to Meta's).
Every official model's parameters must carry Meta's names and shapes, and the config table
must say what Meta's yaml files and ``build_sam2`` say.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import sam2
import torch
import yaml
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2_reference import (
    IMAGE_SIZE,
    PROMPTS,
    assert_close,
    embed_prompts,
    meta_sam2,
    photo,
    segany_predict,
    segany_sam2,
    yaml_path,
)
from torch import nn

from segany.modeling.mask_decoder import MaskDecoder, stability_scores
from segany.modeling.sam2 import (
    SAM2_CONFIGS,
    Sam2,
    Sam2ImageEmbedding,
    convert_official_state_dict,
    split_official_state_dict,
)
from segany.modeling.sam2_configs import SAM2_ENCODER_CONFIGS
from segany.modeling.transformer import TwoWayTransformer


@pytest.fixture(scope="module")
def meta_model() -> SAM2Base:
    return meta_sam2()


@pytest.fixture(scope="module")
def model(meta_model: SAM2Base) -> Sam2:
    return segany_sam2(meta_model)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return photo(*IMAGE_SIZE)


@pytest.fixture(scope="module")
def meta_predictor(meta_model: SAM2Base, image: np.ndarray) -> SAM2ImagePredictor:
    predictor = SAM2ImagePredictor(meta_model)
    predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def embedding(model: Sam2, image: np.ndarray) -> Sam2ImageEmbedding:
    pixels = torch.as_tensor(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model.encode_image(model.preprocess(pixels))


# -- the image side --------------------------------------------------------------------


def test_preprocessing_matches_meta(model, meta_predictor, image) -> None:
    pixels = torch.as_tensor(image).permute(2, 0, 1)[None]
    expected = meta_predictor._transforms(image)[None]
    torch.testing.assert_close(model.preprocess(pixels), expected, atol=1e-6, rtol=0)


def test_image_features_match_meta(embedding, meta_predictor) -> None:
    expected = meta_predictor._features
    pairs = [("image_embed", embedding.image_embed, expected["image_embed"])]
    pairs += [
        (f"high_res_features[{i}]", got, want)
        for i, (got, want) in enumerate(
            zip(embedding.high_res_features, expected["high_res_feats"], strict=True)
        )
    ]
    for name, got, want in pairs:
        assert_close(got.numpy(), want.numpy(), name)
    shapes = [tuple(f.shape) for f in [embedding.image_embed, *embedding.high_res_features]]
    assert shapes == [(1, 256, 64, 64), (1, 32, 256, 256), (1, 64, 128, 128)]


# -- prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompts_match_meta_predictor(
    model, embedding, meta_predictor, prompt: str, multimask: bool
) -> None:
    kwargs = PROMPTS[prompt]
    expected = meta_predictor.predict(**kwargs, multimask_output=multimask, return_logits=True)
    got = segany_predict(model, embedding, IMAGE_SIZE, **kwargs, multimask_output=multimask)
    for name, actual, reference in zip(("masks", "scores", "low_res"), got, expected):
        assert_close(actual, reference, f"{prompt} {name}")
    assert got[0].shape[-2:] == IMAGE_SIZE and got[2].shape[-2:] == (256, 256)
    assert got[1].min() >= 0.0 and got[1].max() <= 1.0  # sigmoid IoU


def test_single_mask_choice_goes_both_ways(model, embedding) -> None:
    """The PROMPTS exercise both of SAM 2's single-mask choices (see
    ``sam2_reference.LOGIT_SCALE``)."""
    decoder, stable = model.mask_decoder, {}
    for prompt, kwargs in PROMPTS.items():
        sparse, dense = embed_prompts(model, IMAGE_SIZE, **kwargs)
        with torch.no_grad():
            masks, _ = decoder.predict_masks(
                embedding.image_embed,
                model.prompt_encoder.get_dense_pe(),
                sparse,
                dense,
                high_res_features=embedding.high_res_features,
            )
        scores = stability_scores(masks[:, 0], decoder.dynamic_multimask_stability_delta)
        stable[prompt] = (scores >= decoder.dynamic_multimask_stability_thresh).tolist()
    assert stable == {
        "click": [False],
        "clicks": [True],
        "box": [False],
        "clicks and box": [True],
        "two objects": [False, True],
    }


@pytest.fixture(scope="module")
def previous_logits(meta_predictor) -> np.ndarray:
    """The best low-res logits (1, 256, 256) for a click: a mask prompt as a user gives it."""
    _, scores, low_res = meta_predictor.predict(**PROMPTS["click"], multimask_output=True)
    return low_res[np.argmax(scores)][None]


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("with_click", [True, False], ids=["mask and click", "mask alone"])
def test_mask_input_matches_meta_predictor(
    model, embedding, meta_predictor, previous_logits, with_click: bool, multimask: bool
) -> None:
    kwargs = {"mask_input": previous_logits, "multimask_output": multimask}
    if with_click:
        kwargs |= {"point_coords": np.array([[320.0, 410.0]]), "point_labels": np.array([0])}
    expected = meta_predictor.predict(**kwargs, return_logits=True)
    got = segany_predict(model, embedding, IMAGE_SIZE, **kwargs)
    for name, actual, reference in zip(("masks", "scores", "low_res"), got, expected):
        assert_close(actual, reference, f"mask input {name}")


# -- the decoder's SAM 2 outputs -------------------------------------------------------


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
def test_decoder_outputs_match_meta(model, meta_model, meta_predictor, multimask: bool) -> None:
    """All four outputs (object scores and the pointer tokens too) for three prompt sets,
    on Meta's own features and prompt embeddings."""
    features = meta_predictor._features
    points = torch.tensor([[[700.0, 250.0], [300.0, 400.0]], [[100.0, 90.0], [900, 500]]])
    points = torch.cat([points, torch.tensor([[[512.0, 512.0], [0.0, 0.0]]])])
    labels = torch.tensor([[1, 0], [2, 3], [1, -1]], dtype=torch.int32)
    with torch.no_grad():
        sparse, dense = meta_model.sam_prompt_encoder(
            points=(points, labels), boxes=None, masks=None
        )
        pe = meta_model.sam_prompt_encoder.get_dense_pe()
        arguments = (features["image_embed"], pe, sparse, dense, multimask)
        expected = meta_model.sam_mask_decoder(
            *arguments, repeat_image=True, high_res_features=features["high_res_feats"]
        )
        got = model.mask_decoder.decode(*arguments, high_res_features=features["high_res_feats"])
        forward = model.mask_decoder(*arguments, high_res_features=features["high_res_feats"])
    names = ("masks", "iou_pred", "mask_tokens", "object_score_logits")
    for name, actual, reference in zip(names, got, expected, strict=True):
        assert_close(actual.numpy(), reference.numpy(), name)
    assert got.mask_tokens.shape == (3, 3 if multimask else 1, 256)
    assert torch.equal(forward[0], got.masks) and torch.equal(forward[1], got.iou_pred)


def test_dynamic_single_mask_matches_meta(model, meta_model) -> None:
    """The single-mask fallback, on logits made so that some sets are stable and some not."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 16, 16, generator=generator)
    logits[:3, 0] = 5.0 * torch.sign(logits[:3, 0])  # no logit near 0: stable
    logits[0, 0, 0, 0] = 0.01  # one pixel within +-delta: still stable (above 0.98)
    logits[5, 0] = -5.0  # empty at both thresholds: stability 1
    iou = torch.rand(6, 4, generator=generator)
    got = model.mask_decoder.stable_single_or_best_multimask(logits, iou)
    expected = meta_model.sam_mask_decoder._dynamic_multimask_via_stability(logits, iou)
    for actual, reference in zip(got, expected, strict=True):
        assert torch.equal(actual, reference)
    stable = stability_scores(logits[:, 0], 0.05) >= 0.98
    assert stable.tolist() == [True, True, True, False, False, True]
    assert torch.equal(got[0][3, 0], logits[3, 1 + iou[3, 1:].argmax()])


def test_sam_decoder_is_unchanged_by_default() -> None:
    """Without SAM 2's options the decoder has SAM's parameters, tokens and outputs."""
    decoder = MaskDecoder(
        transformer_dim=32,
        transformer=TwoWayTransformer(depth=1, embedding_dim=32, num_heads=2, mlp_dim=64),
    )
    assert not any("obj_score" in key for key in decoder.state_dict())
    assert decoder.output_tokens(2).shape == (2, 5, 32)
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 32, 8, 8, generator=generator)
    sparse = torch.randn(2, 3, 32, generator=generator)
    dense = torch.randn(2, 32, 8, 8, generator=generator)
    with torch.no_grad():
        masks, iou = decoder(embedding, torch.zeros_like(embedding), sparse, dense, False)
        every = decoder.predict_masks(embedding, torch.zeros_like(embedding), sparse, dense)
    assert torch.equal(masks, every[0][:, :1]) and torch.equal(iou, every[1][:, :1])


# -- parameters and configs ------------------------------------------------------------


@pytest.fixture
def no_weight_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names and shapes only: skip the large models' weight initialisation."""
    for layer in (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm, nn.Embedding):
        monkeypatch.setattr(layer, "reset_parameters", lambda self: None)


@pytest.mark.parametrize("name", sorted(SAM2_CONFIGS))
def test_official_state_dict_loads(name: str, no_weight_init: None) -> None:
    """Every tensor of Meta's model (a checkpoint's ``model`` dict) loads into segany's
    model strictly, the memory attention's and memory encoder's included; and the
    decoder's options are those ``build_sam2`` gives."""
    meta = build_sam2(yaml_path(name), ckpt_path=None, device="cpu")
    ours = Sam2.from_config(SAM2_CONFIGS[name])
    official = meta.state_dict()
    held, video = split_official_state_dict(official)
    assert {key.split(".")[0] for key in video} == {"memory_attention", "memory_encoder"}
    expected = {key: tuple(value.shape) for key, value in (held | video).items()}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == expected
    ours.load_official_state_dict(official)

    decoder, meta_decoder = ours.mask_decoder, meta.sam_mask_decoder
    for option in (
        "pred_obj_scores",
        "dynamic_multimask_via_stability",
        "dynamic_multimask_stability_delta",
        "dynamic_multimask_stability_thresh",
        "use_multimask_token_for_obj_ptr",
        "num_multimask_outputs",
        "use_high_res_features",
    ):
        assert getattr(decoder, option) == getattr(meta_decoder, option), option
    assert decoder.iou_prediction_head.sigmoid_output == meta.iou_prediction_use_sigmoid
    transformer, meta_transformer = decoder.transformer, meta_decoder.transformer
    for size in ("depth", "embedding_dim", "num_heads", "mlp_dim"):
        assert getattr(transformer, size) == getattr(meta_transformer, size), size
    config = SAM2_CONFIGS[name]
    assert (config.image_size, config.backbone_stride) == (meta.image_size, meta.backbone_stride)
    assert config.directly_add_no_mem_embed == meta.directly_add_no_mem_embed
    assert config.embedding_size == meta.sam_image_embedding_size


def test_official_names_convert_only_where_they_differ() -> None:
    renamed = convert_official_state_dict(
        {
            "sam_mask_decoder.transformer.layers.1.mlp.layers.0.weight": torch.zeros(1),
            "sam_mask_decoder.transformer.layers.1.mlp.layers.1.bias": torch.zeros(1),
            "sam_mask_decoder.iou_prediction_head.layers.1.weight": torch.zeros(1),
            "obj_ptr_proj.layers.0.weight": torch.zeros(1),
        }
    )
    assert list(renamed) == [
        "sam_mask_decoder.transformer.layers.1.mlp.lin1.weight",
        "sam_mask_decoder.transformer.layers.1.mlp.lin2.bias",
        "sam_mask_decoder.iou_prediction_head.layers.1.weight",
        "obj_ptr_proj.layers.0.weight",
    ]


# The yaml fields of ``model`` that only the video model reads (``memory_encoder`` gives
# ``mem_dim``, checked below; the memory modules' own fields are checked by
# test_sam2_memory.py). A field in neither list fails the test: it would go unchecked.
VIDEO_ONLY = {
    "memory_attention",
    "memory_encoder",
    "sigmoid_scale_for_mem_enc",
    "sigmoid_bias_for_mem_enc",
    "use_mask_input_as_output_without_sam",
    "multimask_output_in_sam",
    "multimask_output_for_tracking",
    "multimask_min_pt_num",
    "multimask_max_pt_num",
    "add_tpos_enc_to_obj_ptrs",
    "use_signed_tpos_enc_to_obj_ptrs",
    "only_obj_ptrs_in_the_past_for_eval",
    "fixed_no_obj_ptr",
    "compile_image_encoder",
}
YAML_FIELDS = (
    "image_size",
    "backbone_stride",
    "use_high_res_features_in_sam",
    "directly_add_no_mem_embed",
    "iou_prediction_use_sigmoid",
    "pred_obj_scores",
    "pred_obj_scores_mlp",
    "use_multimask_token_for_obj_ptr",
    "num_maskmem",
    "use_obj_ptrs_in_encoder",
    "use_mlp_for_obj_ptr_proj",
    "proj_tpos_enc_in_obj_ptrs",
    "no_obj_embed_spatial",
)
YAML_SIZES = {"t": "hiera_tiny", "s": "hiera_small", "b+": "hiera_base_plus", "l": "hiera_large"}


@pytest.mark.parametrize("name", sorted(SAM2_CONFIGS))
def test_configs_match_meta_yaml(name: str) -> None:
    path = Path(sam2.__file__).parent / yaml_path(name)
    model = yaml.safe_load(path.read_text())["model"]
    config = SAM2_CONFIGS[name]
    # The encoder's fields are checked against the yaml by test_sam2_encoder.py.
    assert config.encoder is SAM2_ENCODER_CONFIGS[YAML_SIZES[name.rsplit("_", 1)[1]]]
    assert set(model) - {"_target_", "image_encoder"} <= set(YAML_FIELDS) | VIDEO_ONLY
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(SAM2Base).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    given = {**defaults, **model}
    for field in YAML_FIELDS:
        assert getattr(config, field) == given[field], field
    assert config.mem_dim == model["memory_encoder"]["out_dim"]
    assert config.embed_dim == model["image_encoder"]["neck"]["d_model"]

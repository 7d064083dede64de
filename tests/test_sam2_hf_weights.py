"""SAM 2 weights in Hugging Face transformers' naming (``segany.hf_sam2_names``).

transformers' ``Sam2Model`` and ``Sam2VideoModel`` (the installed transformers is the
independent reference) are built from configs matching Meta's ``sam2.1_hiera_t`` and
``sam2_hiera_t`` and given random weights, LayerNorms and zero-initialised tensors
included, so that any tensor put in the wrong place shows. Their state dicts, converted
to Meta's names, must load strictly into segany's :class:`Sam2`, and then segany's image
features, masks, IoU and object scores, memory attention and memory encoder must equal
transformers' on the same inputs to 1e-4 in fp32. Inputs are fed where both models take
the same thing: the normalised 1024 x 1024 image and prompts in its pixels (transformers'
processor and segany's ``preprocess`` are not compared here).
"""

from __future__ import annotations

import importlib
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from segany.build import MODEL_CONFIGS, build_sam_from_config
from segany.hf_sam2_names import (
    HF_VIDEO_ONLY_PREFIXES,
    convert_hf_sam2_state_dict,
    detect_sam2_model,
    is_hf_sam2_state_dict,
)
from segany.loading import load_model, load_model_and_config
from segany.modeling.sam2 import (
    SAM2_CONFIGS,
    VIDEO_MODULES,
    Sam2,
    Sam2ImageEmbedding,
    convert_official_state_dict,
)


def _import_transformers() -> SimpleNamespace:
    """transformers' SAM classes, imported with tests/standins off the path: transformers
    would take the torchvision stand-in there for the real package (which cannot load
    here) and fail. It decides whether torchvision exists once, on first import."""
    standins = [path for path in sys.path if path.endswith("standins")]
    hidden = {
        name: sys.modules.pop(name)
        for name in list(sys.modules)
        if name.split(".")[0] == "torchvision"
    }
    for path in standins:
        sys.path.remove(path)
    try:
        transformers = importlib.import_module("transformers")
        names = (
            "Sam2Config",
            "Sam2Model",
            "Sam2VideoConfig",
            "Sam2VideoModel",
            "SamConfig",
            "SamModel",
        )
        # Attribute access is what imports each model's module (lazily, in transformers).
        return SimpleNamespace(**{name: getattr(transformers, name) for name in names})
    finally:
        sys.path[:0] = standins
        sys.modules.update(hidden)


hf = _import_transformers()
TOLERANCE = 1e-4
# Random weights give mask logits within +-0.2 and IoU near 0.5, where a misplaced tensor
# moves the outputs by little more than TOLERANCE; the last layers of the mask, IoU and
# object-score heads are scaled by this much (mask logits within about +-2), so that it moves
# them by 10 to 100 times TOLERANCE.
HEAD_SCALE = 15.0
NAME = "sam2.1_hiera_t"
# The memory tests run on a small grid: the weights do not depend on it, and transformers
# sizes its RoPE tables by this config entry where segany reads the input's grid.
MEMORY_GRID = 16

# Prompts in pixels of the 1024 x 1024 model input: (points, labels) or a box.
CLICKS = (torch.tensor([[610.0, 380.0], [200.0, 820.0]]), torch.tensor([1, 0]))
BOX = torch.tensor([300.0, 150.0, 880.0, 700.0])
# Meta's names of the tensors only the video model has (transformers' Sam2Model lacks them).
META_VIDEO_ONLY = (
    *VIDEO_MODULES,
    "no_mem_pos_enc",
    "maskmem_tpos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
)


def to_meta_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """segany's names -> Meta's (the inverse of ``convert_official_state_dict``: only the
    decoder transformer's MLPs differ)."""
    return {
        re.sub(r"(\.mlp\.)lin(\d)\.", lambda m: f"{m[1]}layers.{int(m[2]) - 1}.", key): value
        for key, value in state.items()
    }


def randomized(model_class: type, config: object, seed: int) -> torch.nn.Module:
    """transformers' ``model_class(config)`` with no tensor left at a constant: its
    matrices keep transformers' random initialisation (seeded); vectors (norms,
    biases, layer scales) and tensors initialised to zero (position embeddings, the
    no-memory embedding, ...) are drawn here. Its two copies of the Fourier matrix are
    tied, as in transformers' released files, and its heads sharpened
    (:data:`HEAD_SCALE`); in eval mode."""
    torch.manual_seed(seed)
    model = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    decoder = model.mask_decoder
    heads = [*decoder.output_hypernetworks_mlps, decoder.iou_prediction_head]
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or (tensor.ndim > 1 and tensor.any()):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            # Vector weights are norms': near 1, yet each unlike any other.
            is_norm = tensor.ndim == 1 and name.endswith("weight")
            tensor.copy_(1.0 + 0.1 * noise if is_norm else 0.1 * noise)
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding
        )
        for head in [*heads, decoder.pred_obj_score_head]:
            head.proj_out.weight.mul_(HEAD_SCALE)
            head.proj_out.bias.mul_(HEAD_SCALE)
    return model.eval()


def hf_video_config(sam2_1: bool) -> hf.Sam2VideoConfig:
    """transformers' config of Meta's ``sam2[.1]_hiera_t`` (its defaults are the tiny
    model; SAM 2.1 adds two video parameters)."""
    return hf.Sam2VideoConfig(
        enable_occlusion_spatial_embedding=sam2_1,
        enable_temporal_pos_encoding_for_object_pointers=sam2_1,
        memory_attention_rope_feat_sizes=[MEMORY_GRID, MEMORY_GRID],
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> float:
    assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} != {expected.shape}"
    difference = float((actual - expected).detach().abs().max())
    assert difference <= TOLERANCE, f"{name}: max |difference| {difference:.2e}"
    return difference


# -- the image model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_image_model() -> hf.Sam2Model:
    # Sam2Config's defaults are Meta's sam2.1_hiera_t image path.
    return randomized(hf.Sam2Model, hf.Sam2Config(), seed=0)


@pytest.fixture(scope="module")
def image_model(hf_image_model: hf.Sam2Model) -> Sam2:
    """segany's model with the converted image weights; Sam2Model has no video memory,
    so those tensors are the fresh model's own."""
    model = Sam2.from_config(SAM2_CONFIGS[NAME]).eval()
    converted = convert_hf_sam2_state_dict(hf_image_model.state_dict())
    model.load_official_state_dict({**to_meta_names(model.state_dict()), **converted})
    return model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """A normalised model input (what both libraries' preprocessing yields)."""
    return torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_embeddings(hf_image_model: hf.Sam2Model, pixels: torch.Tensor) -> list[torch.Tensor]:
    """transformers' decoder inputs: the projected 1/4 and 1/8 levels, then the 1/16 level
    with its no-memory embedding."""
    with torch.no_grad():
        return hf_image_model.get_image_embeddings(pixels)


def test_image_dict_converts_to_metas_image_keys(hf_image_model, image_model) -> None:
    converted = convert_hf_sam2_state_dict(hf_image_model.state_dict())
    official = to_meta_names(image_model.state_dict())
    assert set(converted) == {key for key in official if not key.startswith(META_VIDEO_ONLY)}
    for key, value in converted.items():
        assert value.shape == official[key].shape, key
        assert value.equal(official[key]), key  # what loaded is what was converted


@pytest.fixture(scope="module")
def embedding(image_model: Sam2, pixels: torch.Tensor) -> Sam2ImageEmbedding:
    with torch.no_grad():
        return image_model.encode_image(pixels)


def test_image_features_match_transformers(embedding, hf_embeddings) -> None:
    ours = embedding
    pairs = [
        ("high_res_features[0]", ours.high_res_features[0], hf_embeddings[0]),
        ("high_res_features[1]", ours.high_res_features[1], hf_embeddings[1]),
        ("image_embed", ours.image_embed, hf_embeddings[2]),
    ]
    for name, got, want in pairs:
        assert_close(got, want, name)


def segany_decode(
    model: Sam2,
    embedding: Sam2ImageEmbedding,
    points: torch.Tensor,
    labels: torch.Tensor,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low-res mask logits (M, 256, 256), IoU (M,) and object score logit (1,) for one
    prompt set in model-input pixels (a box as its corners labelled 2 and 3), as SAM 2's
    image predictor decodes."""
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(
            points=(points[None], labels[None].int()), boxes=None, masks=None
        )
        out = model.mask_decoder.decode(
            embedding.image_embed,
            model.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask,
            high_res_features=embedding.high_res_features,
        )
    return out.masks[0], out.iou_pred[0], out.object_score_logits[0]


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", ["clicks", "box"])
def test_prompts_match_transformers(
    image_model, hf_image_model, embedding, hf_embeddings, prompt: str, multimask: bool
) -> None:
    if prompt == "clicks":
        points, labels = CLICKS
        hf_prompt = {"input_points": points[None, None], "input_labels": labels[None, None]}
    else:
        points, labels = BOX.view(2, 2), torch.tensor([2, 3])
        hf_prompt = {"input_boxes": BOX[None, None]}
    with torch.no_grad():
        expected = hf_image_model(
            image_embeddings=hf_embeddings, multimask_output=multimask, **hf_prompt
        )
    masks, iou, object_score = segany_decode(image_model, embedding, points, labels, multimask)
    assert_close(masks, expected.pred_masks[0, 0], f"{prompt} masks")
    assert_close(iou, expected.iou_scores[0, 0], f"{prompt} IoU")
    assert_close(object_score, expected.object_score_logits[0, 0], f"{prompt} object score")
    assert masks.shape == (3 if multimask else 1, 256, 256)


# -- the video model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_video_model() -> hf.Sam2VideoModel:
    return randomized(hf.Sam2VideoModel, hf_video_config(sam2_1=True), seed=2)


@pytest.fixture(scope="module")
def video_model(hf_video_model: hf.Sam2VideoModel) -> Sam2:
    """segany's model loaded strictly from the converted video dict alone."""
    model = Sam2.from_config(SAM2_CONFIGS[NAME]).eval()
    model.load_official_state_dict(convert_hf_sam2_state_dict(hf_video_model.state_dict()))
    return model


@pytest.mark.parametrize("name", ["sam2.1_hiera_t", "sam2_hiera_t"])
def test_every_video_tensor_maps(name: str, request: pytest.FixtureRequest) -> None:
    if name == NAME:
        hf_model = request.getfixturevalue("hf_video_model")
    else:
        hf_model = randomized(hf.Sam2VideoModel, hf_video_config(sam2_1=False), seed=3)
    state = hf_model.state_dict()
    assert is_hf_sam2_state_dict(state)
    converted = convert_hf_sam2_state_dict(state)
    model = Sam2.from_config(SAM2_CONFIGS[name])
    model.load_official_state_dict(converted)  # strict: every tensor both ways
    official = to_meta_names(model.state_dict())
    assert converted.keys() == official.keys()
    assert all(value.equal(official[key]) for key, value in converted.items())
    assert detect_sam2_model(converted) == name
    # Two copies of the Fourier matrix become one, one point table four embeddings; every
    # other tensor of transformers' dict is one of Meta's.
    assert len(converted) == len(state) - 2 + 1 - 1 + 4


def test_memory_attention_matches_transformers(video_model, hf_video_model) -> None:
    generator = torch.Generator().manual_seed(4)
    tokens, pointers = MEMORY_GRID**2, 4  # two memory frames and 4 object-pointer tokens
    curr = torch.randn(1, tokens, 256, generator=generator)
    curr_pos = torch.randn(1, tokens, 256, generator=generator)
    memory = torch.randn(1, 2 * tokens + pointers, 64, generator=generator)
    memory_pos = torch.randn(1, 2 * tokens + pointers, 64, generator=generator)
    with torch.no_grad():
        ours = video_model.memory_attention(curr, curr_pos, memory, memory_pos, pointers)
        # transformers' memory attention takes and returns sequence-first tensors.
        theirs = hf_video_model.memory_attention(
            current_vision_features=curr.transpose(0, 1),
            memory=memory.transpose(0, 1),
            current_vision_position_embeddings=curr_pos.transpose(0, 1),
            memory_posision_embeddings=memory_pos.transpose(0, 1),
            num_object_pointer_tokens=pointers,
        )
    # (It returns (1, B, HW, C): its layers keep a point-batch axis of 1.)
    assert_close(ours, theirs[0], "memory attention")


def test_memory_encoder_matches_transformers(video_model, hf_video_model) -> None:
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1, 256, MEMORY_GRID, MEMORY_GRID, generator=generator)
    # transformers' encoder takes the mask as its model makes it (a scaled sigmoid).
    masks = torch.rand(1, 1, 16 * MEMORY_GRID, 16 * MEMORY_GRID, generator=generator)
    with torch.no_grad():
        ours = video_model.memory_encoder(features, masks, skip_mask_sigmoid=True)
        theirs, theirs_pos = hf_video_model.memory_encoder(features, masks)
    assert_close(ours.features, theirs, "memory features")
    assert_close(ours.pos_enc, theirs_pos, "memory position encoding")


def test_video_parameters_land_in_place(video_model, hf_video_model) -> None:
    """The video model's free-standing tensors and small layers, which no forward above
    runs, each in its place (by value: random, so no two are alike)."""
    theirs, ours = hf_video_model, video_model
    pairs = [
        (ours.no_mem_embed, theirs.no_memory_embedding),
        (ours.no_mem_pos_enc, theirs.no_memory_positional_encoding),
        (ours.maskmem_tpos_enc, theirs.memory_temporal_positional_encoding),
        (ours.no_obj_ptr, theirs.no_object_pointer),
        (ours.no_obj_embed_spatial, theirs.occlusion_spatial_embedding_parameter),
        (ours.mask_downsample.weight, theirs.mask_downsample.weight),
        (
            ours.obj_ptr_tpos_proj.weight,
            theirs.temporal_positional_encoding_projection_layer.weight,
        ),
    ]
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pairs.append((ours.obj_ptr_proj(x), theirs.object_pointer_proj(x)))
    for i, (got, want) in enumerate(pairs):
        assert_close(got, want, f"video parameter {i}")


# -- recognising and converting ---------------------------------------------------------


def test_differing_fourier_copies_are_refused(hf_image_model) -> None:
    state = dict(hf_image_model.state_dict())
    state["shared_image_embedding.positional_embedding"] = torch.zeros(2, 128)
    with pytest.raises(ValueError, match="differ"):
        convert_hf_sam2_state_dict(state)
    del state["shared_image_embedding.positional_embedding"]  # one copy is enough
    assert "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in (
        convert_hf_sam2_state_dict(state)
    )


def test_only_transformers_sam2_is_recognised(hf_image_model) -> None:
    with torch.device("meta"):
        hf_sam1 = hf.SamModel(hf.SamConfig()).state_dict()
        segany_sam1 = build_sam_from_config(MODEL_CONFIGS["vit_b"]).state_dict()
        meta_sam2 = to_meta_names(Sam2.from_config(SAM2_CONFIGS[NAME]).state_dict())
    assert is_hf_sam2_state_dict(hf_image_model.state_dict())
    assert is_hf_sam2_state_dict(iter(hf_image_model.state_dict()))  # keys alone do
    for other in (hf_sam1, segany_sam1, meta_sam2, {}):
        assert not is_hf_sam2_state_dict(other)
    with pytest.raises(ValueError, match="not a transformers SAM 2"):
        convert_hf_sam2_state_dict(hf_sam1)
    assert not any(key.startswith(HF_VIDEO_ONLY_PREFIXES) for key in hf_image_model.state_dict())


@pytest.mark.parametrize("name", SAM2_CONFIGS)
def test_detects_every_official_model(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory or time for hiera_l's weights
        state = to_meta_names(Sam2.from_config(SAM2_CONFIGS[name]).state_dict())
    assert detect_sam2_model(state) == name
    image_only = {k: v for k, v in state.items() if not k.startswith(META_VIDEO_ONLY)}
    # Without SAM 2.1's video parameters the version cannot be told; the size still can.
    assert detect_sam2_model(image_only) == name.replace("sam2.1_", "sam2_")


@pytest.mark.parametrize("name", [*MODEL_CONFIGS])
def test_sam1_is_not_detected_as_sam2(name: str) -> None:
    config = MODEL_CONFIGS[name]
    # The ViTs as shapes only (vit_h's weights are 2.5 GB); the small encoders copy
    # tensors while building, which the meta device cannot.
    device = "meta" if name.startswith(("vit_h", "vit_l", "vit_b")) else "cpu"
    with torch.device(device):
        state = build_sam_from_config(config).state_dict()
    assert detect_sam2_model(state) is None


def _save_as_hub_file(model: torch.nn.Module, path) -> None:
    """A model's state dict as the Hub's ``model.safetensors`` (untied copies)."""
    save_file({key: value.clone().contiguous() for key, value in model.state_dict().items()}, path)


def test_hub_video_file_loads_by_itself(hf_video_model, video_model, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    _save_as_hub_file(hf_video_model, path)
    model, config = load_model_and_config(None, path, "cpu")  # recognised from its tensors
    assert config == SAM2_CONFIGS[NAME]
    expected = video_model.state_dict()
    assert all(value.equal(expected[key]) for key, value in model.state_dict().items())


def test_hub_image_file_loads_with_a_warning(hf_image_model, image_model, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    _save_as_hub_file(hf_image_model, path)
    with pytest.warns(UserWarning, match="image model only"):
        model = load_model("sam2_t", path, "cpu")
    # Every tensor the file has is the one image_model got; the rest are fresh.
    in_file = convert_official_state_dict(convert_hf_sam2_state_dict(hf_image_model.state_dict()))
    expected, loaded = image_model.state_dict(), model.state_dict()
    assert all(loaded[key].equal(expected[key]) for key in in_file)
    assert not any(key.startswith(VIDEO_MODULES) for key in in_file)

"""SAM 2's image encoder (Hiera trunk + FPN neck) against Meta's ``sam2`` package (1.1.0).

With the same random weights, segany's ``Sam2ImageEncoder`` must give Meta's
``ImageEncoder`` outputs; every size's parameters must carry Meta's names and shapes (so
checkpoints load with ``strict=True``), and the size table must say what Meta's yaml
configs say.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import sam2
import torch
import yaml
from reference import randomize_  # puts tests/standins (torchvision for sam2) on sys.path
from sam2.modeling.backbones.hieradet import Hiera as MetaHiera
from sam2.modeling.backbones.image_encoder import FpnNeck as MetaFpnNeck
from sam2.modeling.backbones.image_encoder import ImageEncoder as MetaImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from torch import nn

from segany.modeling.sam2_configs import SAM2_ENCODER_CONFIGS, Sam2EncoderConfig
from segany.modeling.sam2_image_encoder import Sam2ImageEncoder

TOLERANCE = 1e-4

# A small Hiera that runs in a fraction of a second and still has every path: global and
# windowed blocks in the same stage, windows that need padding (at 128 x 160 px the last
# stages' grids are 8 x 10 and 4 x 5, windows 6 and 3), a pooling block on padded windows,
# a non-square background table and several heads.
SMALL = Sam2EncoderConfig(
    embed_dim=32,
    num_heads=2,
    stages=(1, 2, 2, 1),
    global_att_blocks=(2, 4),
    window_spec=(8, 4, 6, 3),
    window_pos_embed_bkg_spatial_size=(6, 9),
    d_model=64,
)


def build_meta(config: Sam2EncoderConfig) -> MetaImageEncoder:
    """Meta's encoder for ``config``, put together as its yaml configs do."""
    trunk = MetaHiera(
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        stages=config.stages,
        global_att_blocks=config.global_att_blocks,
        window_pos_embed_bkg_spatial_size=config.window_pos_embed_bkg_spatial_size,
        window_spec=config.window_spec,
    )
    neck = MetaFpnNeck(
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=config.d_model, normalize=True, scale=None, temperature=10000
        ),
        d_model=config.d_model,
        backbone_channel_list=list(config.backbone_channel_list),
        fpn_top_down_levels=list(config.fpn_top_down_levels),
        fpn_interp_model=config.fpn_interp_mode,
    )
    return MetaImageEncoder(trunk=trunk, neck=neck, scalp=config.scalp)


def encoder_pair(config: Sam2EncoderConfig, seed: int) -> tuple[nn.Module, Sam2ImageEncoder]:
    """Meta's and segany's encoders with the same random weights, in eval mode."""
    meta = randomize_(build_meta(config), seed).eval()
    ours = Sam2ImageEncoder.from_config(config).eval()
    ours.load_state_dict(meta.state_dict(), strict=True)
    return meta, ours


def assert_same_outputs(
    meta: nn.Module, ours: Sam2ImageEncoder, image: torch.Tensor, tolerance: float = TOLERANCE
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Run both on ``image`` and compare every output, dtypes included; returns segany's."""
    with torch.no_grad():
        expected = meta(image)
        got = ours(image)._asdict()
    assert got.keys() == expected.keys()
    pairs = [("vision_features", got["vision_features"], expected["vision_features"])]
    for key in ("backbone_fpn", "vision_pos_enc"):
        assert len(got[key]) == len(expected[key])
        pairs += [(f"{key}[{i}]", a, b) for i, (a, b) in enumerate(zip(got[key], expected[key]))]
    for name, actual, reference in pairs:
        assert actual.shape == reference.shape, name
        assert actual.dtype == reference.dtype, name
        difference = (actual.float() - reference.float()).abs().max().item()
        assert difference <= tolerance, f"{name}: max |difference| {difference:.2e}"
    return got


@pytest.mark.parametrize(
    "neck",
    [
        {},  # SAM 2's neck: nearest upsampling, top-down into levels 2 and 3, scalp 1
        {"fpn_interp_mode": "bilinear", "fpn_top_down_levels": (0, 1, 2, 3), "scalp": 0},
    ],
    ids=["sam2-neck", "bilinear-all-levels"],
)
def test_small_encoder_matches_meta(neck: dict) -> None:
    config = Sam2EncoderConfig(**{**SMALL.__dict__, **neck})
    meta, ours = encoder_pair(config, seed=0)
    # Batch of two, and not square, so that rows, columns and samples cannot be mixed up.
    image = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    assert_same_outputs(meta, ours, image)


def test_bfloat16_outputs_have_meta_dtypes() -> None:
    # Meta's neck upsamples in float32 and adds that to the lateral features, so in a
    # bfloat16 model the levels with top-down features (and their position encodings)
    # come out in float32: vision_features is float32. segany keeps that.
    meta, ours = encoder_pair(SMALL, seed=4)
    meta.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    got = assert_same_outputs(meta, ours, image.bfloat16(), tolerance=2e-2)
    assert [level.dtype for level in got["backbone_fpn"]] == [
        torch.bfloat16,
        torch.bfloat16,
        torch.float32,
    ]


def test_hiera_tiny_matches_meta_at_1024() -> None:
    meta, ours = encoder_pair(SAM2_ENCODER_CONFIGS["hiera_tiny"], seed=2)
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    got = assert_same_outputs(meta, ours, image)
    shapes = [tuple(level.shape) for level in got["backbone_fpn"]]
    assert shapes == [(1, 256, 256, 256), (1, 256, 128, 128), (1, 256, 64, 64)]


@pytest.mark.parametrize("name", sorted(SAM2_ENCODER_CONFIGS))
def test_parameters_are_named_as_meta(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only names and shapes are compared: skip the initialisation of the large models'
    # weights, which would take most of this test's time.
    for layer in (nn.Linear, nn.Conv2d, nn.LayerNorm):
        monkeypatch.setattr(layer, "reset_parameters", lambda self: None)
    config = SAM2_ENCODER_CONFIGS[name]
    expected = {key: tuple(value.shape) for key, value in build_meta(config).state_dict().items()}
    ours = Sam2ImageEncoder.from_config(config).state_dict()
    assert {key: tuple(value.shape) for key, value in ours.items()} == expected


def as_tuple(value: object) -> object:
    """Lists (yaml) and tuples (the table) compared alike."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


YAML_SIZES = {"t": "hiera_tiny", "s": "hiera_small", "b+": "hiera_base_plus", "l": "hiera_large"}


@pytest.mark.parametrize("version", ["sam2", "sam2.1"])
@pytest.mark.parametrize("suffix", sorted(YAML_SIZES))
def test_configs_match_meta_yaml(version: str, suffix: str) -> None:
    path = Path(sam2.__file__).parent / "configs" / version / f"{version}_hiera_{suffix}.yaml"
    encoder = yaml.safe_load(path.read_text())["model"]["image_encoder"]
    config = SAM2_ENCODER_CONFIGS[YAML_SIZES[suffix]]

    # A field the yaml sets that this table does not know would go unchecked.
    trunk_fields = {
        "embed_dim",
        "num_heads",
        "stages",
        "global_att_blocks",
        "window_spec",
        "window_pos_embed_bkg_spatial_size",
    }
    assert set(encoder["trunk"]) - {"_target_"} <= trunk_fields
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(MetaHiera).parameters.items()
    }
    trunk = {**defaults, **encoder["trunk"]}
    for field in trunk_fields:
        assert as_tuple(getattr(config, field)) == as_tuple(trunk[field]), field
    # What segany's Hiera takes as fixed: query pooling 2x2 at every stage transition,
    # channels and heads doubling there, no stochastic depth at inference.
    assert (trunk["q_pool"], tuple(trunk["q_stride"])) == (len(config.stages) - 1, (2, 2))
    assert (trunk["dim_mul"], trunk["head_mul"], trunk["drop_path_rate"]) == (2.0, 2.0, 0.0)

    neck = encoder["neck"]
    assert encoder["scalp"] == config.scalp
    assert neck["d_model"] == config.d_model
    assert tuple(neck["backbone_channel_list"]) == config.backbone_channel_list
    assert tuple(neck["fpn_top_down_levels"]) == config.fpn_top_down_levels
    assert neck["fpn_interp_model"] == config.fpn_interp_mode
    assert neck.get("fuse_type", "sum") == "sum"
    position = neck["position_encoding"]
    assert position["_target_"].endswith("PositionEmbeddingSine")
    assert (position["num_pos_feats"], position["normalize"]) == (config.d_model, True)
    assert (position["scale"], position["temperature"]) == (None, 10000)


def test_image_sides_must_be_multiples_of_32() -> None:
    encoder = Sam2ImageEncoder.from_config(SMALL)
    with pytest.raises(ValueError, match="multiples of 32"):
        encoder(torch.zeros(1, 3, 128, 144))

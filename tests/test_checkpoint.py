"""Checkpoint reading, conversion, detection and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import TINY_CONFIG, build_mobile_sam, randomize_

from segany import SeganyError, build_sam, load_model, sam_model_registry
from segany.build import MODEL_CONFIGS, build_sam_from_config
from segany.checkpoint import detect_model_type, read_state_dict, save_weights


@pytest.fixture(scope="module")
def vit_b_state() -> dict[str, torch.Tensor]:
    return build_sam_from_config(MODEL_CONFIGS["vit_b"]).state_dict()


def test_registry_has_all_models() -> None:
    assert {"vit_h", "vit_l", "vit_b", "vit_t", "default"} <= set(sam_model_registry)


def test_model_sizes() -> None:
    """ViT-B SAM has 93.7M parameters; vit_t has MobileSAM's less its unused classifier."""
    vit_b = sum(p.numel() for p in sam_model_registry["vit_b"]().parameters())
    assert abs(vit_b - 93.7e6) / 93.7e6 < 0.001
    reference = build_mobile_sam()
    expected = sum(
        p.numel()
        for name, p in reference.named_parameters()
        if not name.startswith(("image_encoder.head.", "image_encoder.norm_head."))
    )
    assert sum(p.numel() for p in sam_model_registry["vit_t"]().parameters()) == expected


def test_detects_model_types(vit_b_state) -> None:
    assert detect_model_type(vit_b_state) == "vit_b"
    assert detect_model_type(build_mobile_sam().state_dict()) == "vit_t"
    assert detect_model_type(build_sam_from_config(TINY_CONFIG).state_dict()) is None


def test_wrong_model_names_the_right_one(tmp_path: Path, vit_b_state) -> None:
    path = tmp_path / "sam_vit_b.pth"
    torch.save(vit_b_state, path)
    with pytest.raises(SeganyError) as caught:
        build_sam("vit_t", checkpoint=path)
    message = str(caught.value)
    assert "does not fit model 'vit_t'" in message
    assert "292 missing keys (image_encoder.patch_embed.seq.0.c.weight" in message
    assert "171 unexpected keys (image_encoder.pos_embed" in message
    assert "looks like a 'vit_b' checkpoint: use --model vit_b" in message
    assert "\n" not in message
    # Auto-detection picks the right architecture.
    assert load_model(checkpoint=path).image_encoder.blocks[0].attn.qkv.in_features == 768


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    state = build_sam_from_config(TINY_CONFIG).state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    with pytest.raises(
        SeganyError,
        match=r"1 shape mismatches \(mask_decoder.iou_token.weight \(1, 128\) vs \(1, 256\)\)",
    ):
        build_sam(TINY_CONFIG, checkpoint=state)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a checkpoint at all", "cannot read checkpoint"), (b"", "cannot read checkpoint")],
)
def test_unreadable_checkpoint(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(SeganyError, match=message):
        read_state_dict(path)


def test_missing_checkpoint() -> None:
    with pytest.raises(SeganyError, match=r"checkpoint not found: /no/such\.pth"):
        build_sam("vit_t", checkpoint="/no/such.pth")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint that would run code on load is an error."""
    path = tmp_path / "evil.pth"
    torch.save({"model": build_sam_from_config(TINY_CONFIG).state_dict(), "extra": Path("x")}, path)
    with pytest.raises(SeganyError, match="cannot read checkpoint"):
        read_state_dict(path)


def test_safetensors_round_trip_and_training_checkpoint(tmp_path: Path) -> None:
    model = randomize_(build_sam_from_config(TINY_CONFIG), seed=4)
    path = save_weights(model, tmp_path / "tiny.safetensors", {"segany_model": "tiny"})
    loaded = build_sam(TINY_CONFIG, checkpoint=path)
    wrapped = tmp_path / "train.pt"
    torch.save(
        {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 3}, wrapped
    )
    from_training = build_sam(TINY_CONFIG, checkpoint=wrapped)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
        assert torch.equal(from_training.state_dict()[key], value)


def test_unknown_model_name() -> None:
    with pytest.raises(SeganyError, match="unknown model 'vit_x'; choose one of: vit_h"):
        build_sam("vit_x")

"""SAM 2's video memory modules against Meta's ``sam2`` package (1.1.0).

Meta's ``MemoryAttention`` and ``MemoryEncoder`` are built from the ``sam2.1_hiera_t``
config (hydra, as ``build_sam2`` does; every official config has the same two), given
random weights (biases, norms and layer scales included) and copied into segany's modules
through their state dicts; outputs must agree to 1e-5 in fp32. Every official model's
full state dict must load strictly into ``Sam2.from_config`` (tests/test_sam2_image.py
checks it on Meta's models; here the memory configs are checked against the yaml files).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sam2
import torch
import yaml
from hydra import compose
from hydra.utils import instantiate
from reference import randomize_  # puts tests/standins (torchvision for sam2) on sys.path
from sam2.modeling.memory_attention import MemoryAttention as MetaMemoryAttention
from sam2.modeling.memory_encoder import MemoryEncoder as MetaMemoryEncoder
from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis
from sam2_reference import NAME, meta_sam2, segany_sam2, yaml_path

from segany.modeling.memory_attention import (
    MemoryAttention,
    axial_rope_angles,
    rotate_pairs,
    rotations,
)
from segany.modeling.memory_encoder import MemoryEncoder
from segany.modeling.sam2 import SAM2_CONFIGS

TOLERANCE = 1e-5
CONFIG = SAM2_CONFIGS[NAME]
C, C_MEM = CONFIG.embed_dim, CONFIG.mem_dim
POINTER_TOKENS = C // C_MEM  # one object pointer, split into mem_dim-wide tokens


def meta_part(name: str) -> torch.nn.Module:
    """Meta's ``model.<name>`` of :data:`NAME` with random weights, in eval mode."""
    torch.manual_seed(0)
    part = instantiate(compose(config_name=yaml_path(NAME)).model[name], _recursive_=True)
    return randomize_(part, seed=1).eval()


@pytest.fixture(scope="module")
def attention_pair() -> tuple[MetaMemoryAttention, MemoryAttention]:
    meta = meta_part("memory_attention")
    ours = MemoryAttention(C, C_MEM, CONFIG.memory_attention).eval()
    ours.load_state_dict(meta.state_dict(), strict=True)
    return meta, ours


@pytest.fixture(scope="module")
def encoder_pair() -> tuple[MetaMemoryEncoder, MemoryEncoder]:
    meta = meta_part("memory_encoder")
    ours = MemoryEncoder(C, C_MEM, CONFIG.backbone_stride, CONFIG.memory_encoder).eval()
    ours.load_state_dict(meta.state_dict(), strict=True)
    return meta, ours


def max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    return float((actual - expected).abs().max())


# -- rotary position encoding ----------------------------------------------------------


@pytest.mark.parametrize("repeat", [1, 3])
def test_rope_matches_meta(repeat: int) -> None:
    """The real-valued rotation equals Meta's complex one, keys of several grids included."""
    side, head_dim = 8, 32
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, side * side, head_dim, generator=generator)
    k = torch.randn(2, 2, repeat * side * side, head_dim, generator=generator)
    meta_q, meta_k = apply_rotary_enc(
        q, k, compute_axial_cis(head_dim, side, side), repeat_freqs_k=repeat > 1
    )
    angles = axial_rope_angles(side, head_dim)
    assert max_difference(rotate_pairs(q, rotations(angles)), meta_q) <= 1e-6
    assert max_difference(rotate_pairs(k, rotations(angles.repeat(repeat, 1))), meta_k) <= 1e-6


# -- memory attention ------------------------------------------------------------------


def memory_inputs(
    side: int, frames: int, pointers: int, batch: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Batch-first (curr, curr_pos, memory, memory_pos): a frame's side² tokens, and
    ``frames`` memory frames of side² tokens followed by ``pointers`` object pointers
    split into C / C_mem tokens each, as SAM2Base assembles them."""
    generator = torch.Generator().manual_seed(seed)
    curr = torch.randn(batch, side * side, C, generator=generator)
    curr_pos = torch.randn(batch, side * side, C, generator=generator)
    spatial = torch.randn(batch, frames * side * side, C_MEM, generator=generator)
    spatial_pos = torch.randn(batch, frames * side * side, C_MEM, generator=generator)
    # Each pointer's C channels become C / C_mem consecutive tokens sharing one encoding.
    pointer_tokens = torch.randn(batch, pointers, C, generator=generator)
    pointer_tokens = pointer_tokens.reshape(batch, pointers * POINTER_TOKENS, C_MEM)
    pointer_pos = torch.randn(batch, pointers, 1, C_MEM, generator=generator)
    pointer_pos = pointer_pos.expand(-1, -1, POINTER_TOKENS, -1).flatten(1, 2)
    memory = torch.cat((spatial, pointer_tokens), dim=1)
    memory_pos = torch.cat((spatial_pos, pointer_pos), dim=1)
    return curr, curr_pos, memory, memory_pos


@pytest.mark.parametrize(
    ("side", "frames", "pointers", "batch"),
    [(16, 2, 4, 2), (16, 3, 0, 1), (8, 1, 1, 1), (64, 1, 2, 1)],
    ids=["16x16 2 frames 4 pointers batch 2", "no pointers", "8x8", "64x64 1 frame 2 pointers"],
)
def test_memory_attention_matches_meta(
    attention_pair, side: int, frames: int, pointers: int, batch: int
) -> None:
    meta, ours = attention_pair
    curr, curr_pos, memory, memory_pos = memory_inputs(side, frames, pointers, batch)
    num_pointer_tokens = pointers * POINTER_TOKENS
    with torch.no_grad():
        # Meta's module takes and returns sequence-first tensors.
        expected = meta(
            curr=curr.transpose(0, 1),
            curr_pos=curr_pos.transpose(0, 1),
            memory=memory.transpose(0, 1),
            memory_pos=memory_pos.transpose(0, 1),
            num_obj_ptr_tokens=num_pointer_tokens,
        ).transpose(0, 1)
        got = ours(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=num_pointer_tokens)
    assert got.shape == (batch, side * side, C)
    assert max_difference(got, expected) <= TOLERANCE


def test_pointer_tokens_are_not_rotated(attention_pair) -> None:
    """Swapping two pointer tokens (excluded from RoPE) changes nothing; swapping two of a
    frame's tokens does (a key's rotation is its grid cell)."""
    _, ours = attention_pair
    curr, curr_pos, memory, memory_pos = memory_inputs(8, 1, 2, 1)
    num_pointer_tokens = 2 * POINTER_TOKENS

    def attend_in_order(order: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return ours(curr, curr_pos, memory[:, order], memory_pos[:, order], num_pointer_tokens)

    tokens = list(range(memory.shape[1]))
    reference = attend_in_order(tokens)
    # The last token of each pointer (the same channels of two pointers) trade places.
    pointers_swapped = tokens.copy()
    last, previous = tokens[-1], tokens[-1 - POINTER_TOKENS]
    pointers_swapped[-1], pointers_swapped[-1 - POINTER_TOKENS] = previous, last
    cells_swapped = [1, 0, *tokens[2:]]
    assert max_difference(attend_in_order(pointers_swapped), reference) <= TOLERANCE
    assert max_difference(attend_in_order(cells_swapped), reference) > 1e-3


def test_memory_attention_refuses_what_rope_cannot_place(attention_pair) -> None:
    _, ours = attention_pair
    curr, curr_pos, memory, memory_pos = memory_inputs(8, 1, 1, 1)
    with torch.no_grad(), pytest.raises(ValueError, match="square grid"):
        ours(curr[:, 1:], curr_pos[:, 1:], memory, memory_pos, POINTER_TOKENS)
    with torch.no_grad(), pytest.raises(ValueError, match="whole grids"):
        ours(curr, curr_pos, memory, memory_pos, POINTER_TOKENS - 1)


# -- memory encoder --------------------------------------------------------------------


@pytest.mark.parametrize("skip_mask_sigmoid", [False, True], ids=["logits", "probabilities"])
def test_memory_encoder_matches_meta(encoder_pair, skip_mask_sigmoid: bool) -> None:
    meta, ours = encoder_pair
    generator = torch.Generator().manual_seed(0)
    pix_feat = torch.randn(1, C, 64, 64, generator=generator)
    # Smooth logits with a sharp edge, as a predicted mask; or SAM2Base's scaled sigmoid.
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 1024), torch.linspace(-1, 1, 1024), indexing="ij")
    masks = (0.5 - (xs**2 + 2 * ys**2).sqrt()) * 40 + torch.randn(1024, 1024, generator=generator)
    masks = masks[None, None]
    if skip_mask_sigmoid:
        masks = torch.sigmoid(masks) * 20.0 - 10.0
    with torch.no_grad():
        expected = meta(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
        got = ours(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
    assert got.features.shape == (1, C_MEM, 64, 64)
    assert max_difference(got.features, expected["vision_features"]) <= TOLERANCE
    assert max_difference(got.pos_enc, expected["vision_pos_enc"][0]) <= TOLERANCE


def test_memory_encoder_takes_a_batch(encoder_pair) -> None:
    """Two objects of one frame (batch 2) at a smaller size: each as encoded alone."""
    meta, ours = encoder_pair
    generator = torch.Generator().manual_seed(1)
    pix_feat = torch.randn(2, C, 16, 16, generator=generator)
    masks = 4 * torch.randn(2, 1, 256, 256, generator=generator)
    with torch.no_grad():
        expected = meta(pix_feat, masks)["vision_features"]
        got = ours(pix_feat, masks).features
        alone = ours(pix_feat[1:], masks[1:]).features
    assert max_difference(got, expected) <= TOLERANCE
    assert max_difference(alone, got[1:]) <= TOLERANCE


# -- configs and checkpoints -----------------------------------------------------------

# The yaml keys that segany reads from elsewhere (one source per fact) or not at all,
# with the value every official config gives them, checked against the model config.
ATTENTION_DERIVED = {"d_model", "embedding_dim", "kv_in_dim", "feat_sizes"}


@pytest.mark.parametrize("name", sorted(SAM2_CONFIGS))
def test_memory_configs_match_meta_yaml(name: str) -> None:
    path = Path(sam2.__file__).parent / yaml_path(name)
    model = yaml.safe_load(path.read_text())["model"]
    config = SAM2_CONFIGS[name]
    grid = [config.embedding_size] * 2

    attention = model["memory_attention"]
    layer = attention["layer"]
    options = config.memory_attention
    assert attention["_target_"].endswith("memory_attention.MemoryAttention")
    assert (attention["d_model"], layer["d_model"]) == (config.embed_dim, config.embed_dim)
    assert attention["num_layers"] == options.num_layers
    assert attention["pos_enc_at_input"] == options.pos_enc_at_input
    for key in ("activation", "dim_feedforward", "dropout", "pos_enc_at_attn"):
        assert layer[key] == getattr(options, key), key
    for key in ("pos_enc_at_cross_attn_keys", "pos_enc_at_cross_attn_queries"):
        assert layer[key] == getattr(options, key), key
    for role in ("self_attention", "cross_attention"):
        attn = layer[role]
        assert attn["_target_"].endswith("transformer.RoPEAttention"), role
        assert attn["embedding_dim"] == config.embed_dim, role
        assert attn["num_heads"] == options.num_heads, role
        assert attn["downsample_rate"] == 1, role
        assert attn["dropout"] == options.dropout, role
        assert attn["rope_theta"] == options.rope_theta, role
        assert attn["feat_sizes"] == grid, role
        # Self-attention: one grid each side; cross-attention: memory frames of mem_dim.
        assert attn.get("rope_k_repeat", False) == (role == "cross_attention"), role
        assert attn.get("kv_in_dim", config.embed_dim) == (
            config.mem_dim if role == "cross_attention" else config.embed_dim
        ), role

    encoder = model["memory_encoder"]
    sizes = config.memory_encoder
    assert encoder["out_dim"] == config.mem_dim
    assert encoder.get("in_dim", 256) == config.embed_dim  # MemoryEncoder's default
    position = encoder["position_encoding"]
    assert position["num_pos_feats"] == config.mem_dim
    assert (position["normalize"], position["scale"], position["temperature"]) == (
        True,
        None,
        10000,
    )
    downsampler = encoder["mask_downsampler"]
    assert downsampler.get("total_stride", 16) == config.backbone_stride  # Meta's default
    assert (downsampler["kernel_size"], downsampler["stride"], downsampler["padding"]) == (
        sizes.mask_kernel_size,
        sizes.mask_stride,
        sizes.mask_padding,
    )
    fuser = encoder["fuser"]
    block = fuser["layer"]
    assert fuser["num_layers"] == sizes.fuser_layers and "input_projection" not in fuser
    assert block["dim"] == config.embed_dim and block["use_dwconv"]
    assert (block["kernel_size"], block["padding"]) == (
        sizes.fuser_kernel_size,
        sizes.fuser_padding,
    )
    # PyYAML reads "1e-6" (no dot) as a string; hydra, as Meta builds it, as a float.
    assert float(block["layer_scale_init_value"]) == sizes.layer_scale_init_value


def test_full_checkpoint_loads_into_sam2() -> None:
    """Meta's whole model's state dict (an official checkpoint's layout) loads strictly into
    segany's (``segany_sam2`` asserts it), and the memory modules then compute what Meta's
    do. (tests/test_sam2_image.py loads all eight official models' state dicts.)"""
    meta = meta_sam2()
    ours = segany_sam2(meta)
    curr, curr_pos, memory, memory_pos = memory_inputs(8, 2, 1, 1)
    generator = torch.Generator().manual_seed(2)
    pix_feat = torch.randn(1, C, 8, 8, generator=generator)
    masks = 4 * torch.randn(1, 1, 128, 128, generator=generator)
    with torch.no_grad():
        expected = meta.memory_attention(
            curr=curr.transpose(0, 1),
            curr_pos=curr_pos.transpose(0, 1),
            memory=memory.transpose(0, 1),
            memory_pos=memory_pos.transpose(0, 1),
            num_obj_ptr_tokens=POINTER_TOKENS,
        ).transpose(0, 1)
        got = ours.memory_attention(curr, curr_pos, memory, memory_pos, POINTER_TOKENS)
        expected_memory = meta.memory_encoder(pix_feat, masks)["vision_features"]
        got_memory = ours.memory_encoder(pix_feat, masks).features
    assert max_difference(got, expected) <= TOLERANCE
    assert max_difference(got_memory, expected_memory) <= TOLERANCE

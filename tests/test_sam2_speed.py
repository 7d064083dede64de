"""SAM 2's fast inference forms (segany.inference) against the plain modules of
segany.modeling: the same numbers in float32 (1e-5), and masks that overlap float32's
(IoU >= 0.97) where a bfloat16 form is used. Small sizes only: the real-size
comparisons with Meta's code are tests/test_sam2_video.py and tests/test_sam2_predictor.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from segany.inference.memory_attention import FastMemoryAttention, folds_values
from segany.inference.model import InferenceModel
from segany.inference.precision import resolve_precision
from segany.modeling import hiera, image_encoder
from segany.modeling import sam2_tracking as tracking
from segany.modeling.hiera import PooledAttention
from segany.modeling.memory_attention import MemoryAttention, MemoryAttentionConfig
from segany.modeling.sam2 import SAM2_CONFIGS, Sam2

TOLERANCE = 1e-5
GRID = 4  # the memory attention's token grid: 16 queries per frame
SIZE = 128  # model input side of the small SAM 2 (an 8 x 8 embedding grid)


def small_attention(heads: int) -> MemoryAttention:
    """A two-layer memory attention, 64 wide, memory 16 wide (heads * 16 < 64: the
    values fold)."""
    torch.manual_seed(heads)
    config = MemoryAttentionConfig(num_layers=2, num_heads=heads, dim_feedforward=96)
    return MemoryAttention(64, 16, config).eval()


def attention_inputs(frames: int, pointer_tokens: int) -> tuple[torch.Tensor, ...]:
    """curr, curr_pos (2, 16, 64) and memory, memory_pos (2, frames * 16 + pointers, 16)."""
    generator = torch.Generator().manual_seed(frames)
    tokens = frames * GRID * GRID + pointer_tokens
    shapes = [(2, GRID * GRID, 64)] * 2 + [(2, tokens, 16)] * 2
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("fused", [True, False], ids=["fused kernel", "chunks, values folded"])
@pytest.mark.parametrize("frames, pointers", [(1, 0), (3, 8)])
def test_fast_memory_attention_is_the_module(
    heads: int, fused: bool, frames: int, pointers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both forms of every attention, in float32, against MemoryAttention.forward; the
    chunked form over several chunks (a tiny chunk budget)."""
    module = small_attention(heads)
    assert folds_values(module.layers[0].cross_attn_image)
    assert not folds_values(module.layers[0].self_attn)
    monkeypatch.setattr("segany.inference.memory_attention.SCORE_BYTES", 4 * 2 * 3 * 8)
    fast = FastMemoryAttention(module, fused=fused)
    inputs = attention_inputs(frames, pointers)
    with torch.no_grad():
        expected = module(*inputs, num_obj_ptr_tokens=pointers)
        got = fast(*inputs, num_obj_ptr_tokens=pointers)
        again = fast(*inputs, num_obj_ptr_tokens=pointers)  # the rotations from the cache
    assert float((got - expected).abs().max()) <= TOLERANCE
    assert torch.equal(got, again)


def test_fast_memory_attention_refuses_what_rope_cannot_place() -> None:
    module = small_attention(1)
    curr, curr_pos, memory, memory_pos = attention_inputs(2, 0)
    with pytest.raises(ValueError, match="whole grids"):
        FastMemoryAttention(module)(curr, curr_pos, memory[:, :-3], memory_pos[:, :-3])


@pytest.fixture(scope="module")
def small_sam2() -> Sam2:
    """SAM 2.1 tiny at a 128 px input, random weights, mask logits sharpened."""
    torch.manual_seed(0)
    config = dataclasses.replace(SAM2_CONFIGS["sam2.1_hiera_t"], image_size=SIZE)
    model = Sam2.from_config(config).eval()
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(15.0)
            mlp.layers[-1].bias.mul_(15.0)
        model.maskmem_tpos_enc.mul_(50.0)
    return model


def test_encode_frame_is_the_plain_coarse_level(small_sam2: Sam2) -> None:
    """The video frames' features: the coarsest FPN level itself; the image path's
    embedding: it plus no_mem_embed, as Sam2.encode_image."""
    inference = InferenceModel(small_sam2, resolve_precision("fp32", small_sam2.device))
    images = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        coarse, high_res = inference.encode_frame(images)
        embedding, image_high_res = inference.encode(images)
        expected = tracking.encode_frame(small_sam2, images)
        expected_embedding = small_sam2.encode_image(images)
    assert float((coarse - expected.features).abs().max()) <= TOLERANCE
    assert float((embedding - expected_embedding.image_embed).abs().max()) <= TOLERANCE
    for got, want in zip([*high_res, *image_high_res], [*expected.high_res] * 2, strict=True):
        assert float((got - want).abs().max()) <= TOLERANCE


def test_memory_attention_is_made_again_when_weights_change(small_sam2: Sam2) -> None:
    model = Sam2.from_config(small_sam2.config).eval()
    model.load_state_dict(small_sam2.state_dict())
    inference = InferenceModel(model, resolve_precision("bf16", model.device))
    before = inference.memory_attention
    assert before is not None and before.dtype == torch.bfloat16  # a copy in bfloat16
    with torch.no_grad():
        model.memory_attention.layers[0].cross_attn_image.v_proj.weight.mul_(2.0)
    assert inference.refresh()
    assert inference.memory_attention is not before
    layer = model.memory_attention.layers[0].cross_attn_image
    copied = inference.memory_attention.module.layers[0].cross_attn_image
    assert torch.equal(copied.v_proj.weight, layer.v_proj.weight.detach().to(torch.bfloat16))
    folded = inference.memory_attention.folded[id(copied)]
    expected = (layer.out_proj.weight @ layer.v_proj.weight).detach()
    assert float((folded.weight.float() - expected).abs().max()) <= 1e-2 * float(
        expected.abs().max()
    )


def tracked_step(model: Sam2, attention: FastMemoryAttention | None) -> torch.Tensor:
    """One tracked frame's (1, 1, 4h, 4w) mask logits: random features, three memory
    frames (one prompted) and four pointers, as the video predictor keeps them."""
    generator = torch.Generator().manual_seed(5)
    grid = model.config.embedding_size
    dim, mem_dim = model.config.embed_dim, model.config.mem_dim
    frame = tracking.frame_features(
        torch.randn(1, dim, grid, grid, generator=generator),
        [
            torch.randn(1, dim // 8, 4 * grid, 4 * grid, generator=generator),
            torch.randn(1, dim // 4, 2 * grid, 2 * grid, generator=generator),
        ],
    )
    position = tracking.sine_position_encoding(torch.zeros(1, mem_dim, grid, grid))
    memories = [
        tracking.MemoryFrame(
            torch.randn(1, mem_dim, grid, grid, generator=generator).to(torch.bfloat16),
            position,
            t_pos,
        )
        for t_pos in (0, 5, 6)
    ]
    pointers = [
        tracking.ObjectPointer(offset, torch.randn(1, dim, generator=generator))
        for offset in (4, 1, 2, 3)
    ]
    heads = tracking.track_frame(
        model, frame, False, memories, pointers, num_frames=10, attention=attention
    )
    return heads.low_res_masks


@pytest.mark.parametrize("copy", [False, True], ids=["under autocast", "bf16 copy"])
def test_bf16_tracking_step_overlaps_fp32(small_sam2: Sam2, copy: bool) -> None:
    """The float32 step with the fast memory attention is the plain step; in bfloat16
    (chunks, folded values; under the video predictor's autocast, with or without the
    memory attention's bfloat16 copy) its mask overlaps it."""
    fast = FastMemoryAttention(small_sam2.memory_attention)
    bf16_fast = FastMemoryAttention(small_sam2.memory_attention, torch.bfloat16 if copy else None)
    with torch.no_grad():
        expected = tracked_step(small_sam2, None)
        fp32 = tracked_step(small_sam2, fast)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            bf16 = tracked_step(small_sam2, bf16_fast)
    assert float((fp32 - expected).abs().max()) <= 1e-4  # logits of size ~100
    want, got = expected > 0, bf16 > 0
    assert 0.05 < float(want.float().mean()) < 0.95  # a mask with an edge, not all or none
    iou = float((want & got).sum() / (want | got).sum())
    assert iou >= 0.97, iou


@pytest.mark.parametrize("q_stride", [None, 2], ids=["global", "pooled queries"])
def test_hiera_attention_by_products_is_the_textbook_formula(
    monkeypatch: pytest.MonkeyPatch, q_stride: int | None
) -> None:
    """Hiera's attention as products over chunks of query rows (its bfloat16 form on a
    CPU), forced in float32 with chunks of 5 query rows, against softmax(q k^T / sqrt(d)) v
    written out (queries max-pooled 2 x 2 by PyTorch's pooling where the block pools)."""
    g = torch.Generator().manual_seed(0)
    attention = PooledAttention(dim=16, dim_out=32, num_heads=2, q_stride=q_stride).eval()
    x = torch.randn((3, 8, 8, 16), generator=g)
    monkeypatch.setattr(hiera, "_attention_by_products_is_faster", lambda q: True)
    monkeypatch.setattr(image_encoder, "SCORE_CHUNK_BYTES", 3 * 2 * 64 * 4 * 5)
    with torch.no_grad():
        got = attention(x)
        q, k, v = attention.qkv(x).reshape(3, 64, 3, 2, 16).unbind(2)  # (3, 64, heads, 16)
        side = 8
        if q_stride:
            grid = q.reshape(3, 8, 8, 32).permute(0, 3, 1, 2)
            q = F.max_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(3, 16, 2, 16)
            side = 4
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = (q @ k.transpose(-1, -2) / 4).softmax(-1) @ v
        expected = attention.proj(out.transpose(1, 2).reshape(3, side, side, 32))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert hiera._attention_by_products_is_faster(torch.zeros(1, dtype=torch.bfloat16))

"""Correctness of the fast inference paths, against the official package in float32.

Speed itself is measured by benchmarks/bench_speed.py, never here. These tests check that
the paths taken for speed compute the same function: bfloat16 within error bounds, the
folded and batch-shared decoder attention and the chunked encoder attention to float32
rounding, the optional compilation, and the precision options of the command line.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import make_model_pair

from segany import (
    SamAutomaticMaskGenerator,
    SamPredictor,
    SeganyError,
    sam2_automatic_mask_generator,
)
from segany.build import build_sam
from segany.cli import main
from segany.commands import common
from segany.commands import eval as eval_command
from segany.inference import model as inference_model
from segany.inference.attention import fold_image_projection
from segany.inference.mask_decoder import FastMaskDecoder
from segany.inference.model import InferenceModel
from segany.inference.postprocess import upscale_logits_fast
from segany.inference.precision import cpu_has_native_bf16, resolve_precision
from segany.modeling import image_encoder
from segany.modeling.transformer import Attention

ATOL = 1e-4
CPU = torch.device("cpu")


def _real_image(shared_data: Path) -> np.ndarray:
    path = sorted((shared_data / "coco-mval" / "images").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


def _official_predictor(reference: torch.nn.Module):
    if type(reference).__module__.startswith("mobile_sam"):
        from mobile_sam import SamPredictor as ReferencePredictor
    else:
        from segment_anything import SamPredictor as ReferencePredictor
    return ReferencePredictor(reference)


def _relative_error(ours: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    ours, reference = torch.as_tensor(ours).double(), torch.as_tensor(reference).double()
    return float((ours - reference).norm() / reference.norm())


def _decided_iou(logits: np.ndarray, reference: np.ndarray, margin: float = 0.5) -> float:
    """IoU of the masks where the reference logit is clearly decided (|logit| > margin)."""
    decided = np.abs(reference) > margin
    ours, theirs = (logits > 0) & decided, (reference > 0) & decided
    union = (ours | theirs).sum()
    return float((ours & theirs).sum() / union) if union else 1.0


# -------------------------------------------------------------------------------------
# Precision modes
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny", "vit_t"])
def bf16_pair(request, shared_data: Path):
    """(official fp32 predictor, segany bf16 predictor) on the same real image."""
    ours, reference = make_model_pair(request.param, seed=4)
    image = _real_image(shared_data)
    official, fast = _official_predictor(reference), SamPredictor(ours, precision="bf16")
    official.set_image(image)
    fast.set_image(image)
    return official, fast, image


def test_bf16_embedding_close_to_official_fp32(bf16_pair) -> None:
    official, fast, _ = bf16_pair
    embedding = fast.get_image_embedding()
    assert embedding.dtype == torch.float32
    error = _relative_error(embedding, official.get_image_embedding())
    assert 1e-5 < error < 0.02  # really bfloat16 (not float32), and close


def test_bf16_masks_close_to_official_fp32(bf16_pair) -> None:
    official, fast, image = bf16_pair
    height, width = image.shape[:2]
    prompts = [
        {"point_coords": np.array([[0.4 * width, 0.5 * height]]), "point_labels": np.array([1])},
        {"box": np.array([0.2 * width, 0.1 * height, 0.7 * width, 0.9 * height])},
    ]
    for prompt in prompts:
        logits, scores, low_res = fast.predict(**prompt, return_logits=True)
        ref_logits, ref_scores, ref_low_res = official.predict(**prompt, return_logits=True)
        assert logits.dtype == scores.dtype == low_res.dtype == np.float32
        assert _relative_error(low_res, ref_low_res) < 0.05
        np.testing.assert_allclose(scores, ref_scores, atol=0.02)
        assert _decided_iou(logits, ref_logits) > 0.97


@pytest.mark.parametrize(
    ("flags", "kernels", "native"),
    [
        ({"avx512_bf16": True}, "AVX512", True),
        ({"amx_bf16": True}, "AVX512", True),
        ({"avx512_bf16": True}, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2: emulated
        ({"avx2": True}, "AVX2", False),
        ({}, "DEFAULT", False),
    ],
)
def test_native_bf16_needs_the_cpu_and_the_kernels(monkeypatch, flags, kernels, native) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    assert cpu_has_native_bf16() is native
    assert resolve_precision("auto", CPU).name == ("bf16" if native else "fp32")


def test_precision_names_and_devices() -> None:
    assert resolve_precision("fp32", CPU).encoder_dtype is None
    assert resolve_precision("bf16", CPU).encoder_dtype == torch.bfloat16
    assert resolve_precision("bf16", CPU).decoder_dtype == torch.bfloat16
    assert resolve_precision("fp32", CPU).decoder_dtype is None
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto", CPU).name == resolve_precision(None, CPU).name == expected
    # The default model's CNN encoder loses ~8% of its embedding in bf16: auto keeps fp32.
    assert resolve_precision("auto", CPU, build_sam("default")).name == "fp32"
    assert SamPredictor(build_sam("default")).precision.name == "fp32"
    assert SamPredictor(build_sam("default"), "bf16").precision.name == "bf16"
    model, _ = make_model_pair("tiny")
    with pytest.raises(SeganyError, match="fp16 needs a CUDA device"):
        SamPredictor(model, precision="fp16")
    with pytest.raises(SeganyError, match="unknown precision 'fp64'"):
        SamAutomaticMaskGenerator(model, precision="fp64")


def test_bf16_decoder_copy_follows_weight_changes(bf16_pair) -> None:
    """The CPU bf16 decoder is a cast copy; changing the model's decoder must reach it."""
    _, fast, image = bf16_pair
    prompt = {"point_coords": np.array([[image.shape[1] / 2, image.shape[0] / 2]]),
              "point_labels": np.array([1])}  # fmt: skip
    _, scores_before, _ = fast.predict(**prompt)
    head = fast.model.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        head.bias += 1.0
    try:
        _, scores_after, _ = fast.predict(**prompt)
    finally:
        with torch.no_grad():
            head.bias -= 1.0
    np.testing.assert_allclose(scores_after, scores_before + 1.0, atol=0.05)
    _, scores_restored, _ = fast.predict(**prompt)
    np.testing.assert_allclose(scores_restored, scores_before, atol=1e-6)


def test_assigned_features_reach_the_decoder() -> None:
    """The predictor keeps a decoder-ready copy of the embedding; assigning ``features``
    directly (as users of the official predictor do) must refresh it."""
    ours_model, reference = make_model_pair("tiny", seed=1)
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    official = _official_predictor(reference)
    official.set_image(image)
    embedding = torch.randn_like(official.features)
    official.features = embedding
    prompt = {"point_coords": np.array([[50.0, 60.0]]), "point_labels": np.array([1])}
    _, ref_scores, ref_low_res = official.predict(**prompt)
    for precision in ("fp32", "bf16"):
        ours = SamPredictor(ours_model, precision)
        ours.set_image(image)
        ours.features = embedding
        _, scores, low_res = ours.predict(**prompt)
        tolerance = 1e-4 if precision == "fp32" else 0.05
        assert _relative_error(low_res, ref_low_res) < tolerance
        np.testing.assert_allclose(scores, ref_scores, atol=tolerance)


def test_fp16_overflow_falls_back() -> None:
    """An fp16 embedding with inf is recomputed in the fallback precision, with a warning."""
    precision = resolve_precision("bf16", CPU)
    fp16 = type(precision)("fp16", "cpu", torch.float16, None)
    calls: list[torch.dtype] = []

    def encoder(x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        calls.append(dtype)
        return torch.full((1, 2), float("inf") if dtype == torch.float16 else 1.0)

    with pytest.warns(UserWarning, match="overflowed float16"):
        out = fp16.encode(encoder, torch.zeros(1, 3, 4, 4))
    assert calls == [torch.float16, torch.bfloat16]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# -------------------------------------------------------------------------------------
# Mask decoder: shared image side, folded projections, upscaling as products
# -------------------------------------------------------------------------------------


def _fast_decoder(model: torch.nn.Module, fold: bool | None = None) -> FastMaskDecoder:
    """The inference layer's decoder of ``model`` in float32, attention forms ``fold``."""
    fast = InferenceModel(model, resolve_precision("fp32", CPU), fold=fold).fast_decoder
    assert fast is not None
    return fast


@pytest.fixture(scope="module")
def decoder_pair():
    return make_model_pair("tiny", seed=6)


@pytest.mark.parametrize("fold", [None, True, False], ids=["cost-model", "folded", "plain"])
@pytest.mark.parametrize("prompt", ["points", "boxes", "mask"])
def test_batched_decoder_equals_official_per_prompt(
    decoder_pair, fold: bool | None, prompt: str
) -> None:
    """B prompt sets on one embedding in one call (the generator's batch) equal the official
    decoder on each set alone, whichever form the attention takes; so does the plain
    decoder of ``modeling/`` (what training and export run)."""
    ours, official = decoder_pair
    fast = _fast_decoder(ours, fold)
    g = torch.Generator().manual_seed(0)
    batch = 6
    embedding = torch.randn((1, 256, 64, 64), generator=g)
    points = (torch.rand((batch, 2, 2), generator=g) * 1024, torch.ones(batch, 2, dtype=torch.int))
    boxes = torch.sort(torch.rand((batch, 2, 2), generator=g) * 1024, dim=1).values.flatten(1)
    masks = torch.randn((batch, 1, 256, 256), generator=g)
    inputs = {
        "points": {"points": points, "boxes": None, "masks": None},
        "boxes": {"points": None, "boxes": boxes, "masks": None},
        "mask": {"points": points, "boxes": None, "masks": masks},
    }[prompt]
    with torch.no_grad():
        sparse, dense = ours.prompt_encoder(**inputs)
        pe = ours.prompt_encoder.get_dense_pe()
        decodes = [
            fast.decode(embedding, sparse, dense, True),
            ours.mask_decoder(embedding, pe, sparse, dense, True),
        ]
        if prompt != "mask":  # against the image prepared once, as the predictor decodes
            decodes.append(fast.decode_image(fast.prepare_image(embedding), sparse, True))
        for row in range(batch):
            one = {k: None if v is None else _row(v, row) for k, v in inputs.items()}
            ref_sparse, ref_dense = official.prompt_encoder(**one)
            ref_masks, ref_iou = official.mask_decoder(embedding, pe, ref_sparse, ref_dense, True)
            for got_masks, got_iou in decodes:
                torch.testing.assert_close(got_masks[row : row + 1], ref_masks, atol=ATOL, rtol=0)
                torch.testing.assert_close(got_iou[row : row + 1], ref_iou, atol=ATOL, rtol=0)


def _row(value, row: int):
    if isinstance(value, tuple):
        return tuple(v[row : row + 1] for v in value)
    return value[row : row + 1]


def test_per_set_embeddings_equal_official(decoder_pair) -> None:
    """One embedding per prompt set (Sam.forward's layout) through both forms."""
    ours, official = decoder_pair
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn((3, 256, 64, 64), generator=g)
    points = (torch.rand((3, 4, 2), generator=g) * 1024, torch.ones(3, 4, dtype=torch.int))
    with torch.no_grad():
        sparse, dense = ours.prompt_encoder(points=points, boxes=None, masks=None)
        pe = ours.prompt_encoder.get_dense_pe()
        expected = [
            official.mask_decoder(embeddings[i : i + 1], pe, sparse[i : i + 1], dense[:1], False)
            for i in range(3)
        ]
        expected_masks = torch.cat([e[0] for e in expected])
        expected_iou = torch.cat([e[1] for e in expected])
        decodes = [ours.mask_decoder(embeddings, pe, sparse, dense, False)]
        decodes += [
            _fast_decoder(ours, fold).decode(embeddings, sparse, dense, False)
            for fold in (True, False)
        ]
        for got_masks, got_iou in decodes:
            torch.testing.assert_close(got_masks, expected_masks, atol=ATOL, rtol=0)
            torch.testing.assert_close(got_iou, expected_iou, atol=ATOL, rtol=0)


def _random_decoder_inputs(model, seed: int, sets: int, points: int):
    """(embedding, grid encoding, sparse, dense) for ``sets`` sets of random foreground
    clicks on one random embedding."""
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn((1, 256, 64, 64), generator=g)
    clicks = torch.rand((sets, points, 2), generator=g) * 1024
    labels = torch.ones(sets, points, dtype=torch.int)
    sparse, dense = model.prompt_encoder(points=(clicks, labels), boxes=None, masks=None)
    return embedding, model.prompt_encoder.get_dense_pe(), sparse, dense


def test_sam2_decoder_options_equal_the_model() -> None:
    """A decoder with SAM 2's options (object-score token, IoU through a sigmoid, the
    single mask chosen by stability) decodes in the inference layer as in ``modeling/``
    (which tests/test_sam2_image.py holds to Meta's)."""
    from segany.modeling.mask_decoder import MaskDecoder, stability_scores

    model, _ = make_model_pair("tiny", seed=3)
    old = model.mask_decoder
    model.mask_decoder = MaskDecoder(
        transformer_dim=256,
        transformer=old.transformer,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        iou_prediction_use_sigmoid=True,
        dynamic_multimask_via_stability=True,
    ).eval()
    fast = _fast_decoder(model)
    with torch.no_grad():
        embedding, pe, sparse, dense = _random_decoder_inputs(model, 4, sets=6, points=1)
        single = model.mask_decoder.predict_masks(embedding, pe, sparse, dense)[0][:, 0]
        stability = stability_scores(single, model.mask_decoder.dynamic_multimask_stability_delta)
        # A threshold that random weights' masks straddle: some sets keep the single mask.
        model.mask_decoder.dynamic_multimask_stability_thresh = float(stability.median())
        assert 0 < int((stability >= stability.median()).sum()) < 6
        for multimask in (True, False):
            expected = model.mask_decoder(embedding, pe, sparse, dense, multimask)
            decodes = [
                fast.decode(embedding, sparse, dense, multimask),
                fast.decode_image(fast.prepare_image(embedding), sparse, multimask),
            ]
            for got in decodes:
                for value, reference in zip(got, expected, strict=True):
                    torch.testing.assert_close(value, reference, atol=ATOL, rtol=0)


def test_min_iou_skips_only_sets_without_a_passing_mask(decoder_pair) -> None:
    """Sets with a returned mask over min_iou get exactly the masks of a full decode; the
    others get -inf logits and their IoU predictions all the same."""
    ours, _ = decoder_pair
    fast = _fast_decoder(ours)
    with torch.no_grad():
        embedding, _, sparse, dense = _random_decoder_inputs(ours, 12, sets=8, points=2)
        full_masks, full_iou = fast.decode(embedding, sparse, dense, True)
        best = full_iou.max(dim=1).values
        threshold = float(best.median())
        masks, iou = fast.decode(embedding, sparse, dense, True, min_iou=threshold)
        image = fast.prepare_image(embedding)
        image_masks, image_iou = fast.decode_image(image, sparse, True, min_iou=threshold)
    for got_masks, got_iou in ((masks, iou), (image_masks, image_iou)):
        torch.testing.assert_close(got_iou, full_iou, atol=ATOL, rtol=0)
        kept = best > threshold
        assert 0 < int(kept.sum()) < 8
        torch.testing.assert_close(got_masks[kept], full_masks[kept], atol=ATOL, rtol=0)
        assert bool((got_masks[~kept] == float("-inf")).all())


def _count_prepared_images(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each image side the inference layer prepares (FastMaskDecoder.prepare_image)."""
    prepared: list[int] = []
    original = FastMaskDecoder.prepare_image

    def spy(self, *args, **kwargs):
        prepared.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastMaskDecoder, "prepare_image", spy)
    return prepared


def test_image_side_lives_until_the_image_or_weights_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The predictor prepares an image's side on its first decode and keeps it for the
    next clicks; it is made again after the embedding is assigned, the image reset, a
    projection weight or the no-mask embedding edited in place, and then decodes equal
    the official predictor's."""
    ours, official = make_model_pair("tiny", seed=10)
    prepared = _count_prepared_images(monkeypatch)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    predictor, reference = SamPredictor(ours, precision="fp32"), _official_predictor(official)
    predictor.set_image(image)
    reference.set_image(image)

    def check(seed: int) -> None:
        click = {"point_coords": np.random.default_rng(seed).uniform(0, 40, (2, 2)),
                 "point_labels": np.array([1, 0])}  # fmt: skip
        for got, expected in zip(predictor.predict(**click), reference.predict(**click)):
            np.testing.assert_allclose(got, expected, atol=ATOL)

    with torch.no_grad():
        for seed in range(3):
            check(seed)
        assert len(prepared) == 1
        embedding = torch.randn_like(reference.features)
        predictor.features = reference.features = embedding
        check(3)
        assert len(prepared) == 2
        first = "transformer.layers.0.cross_attn_token_to_image.k_proj.weight"
        final = "transformer.final_attn_token_to_image.k_proj.weight"  # its encoding term
        for seed, name in enumerate((first, final), start=4):
            for model in (ours, official):
                model.mask_decoder.get_parameter(name).mul_(0.5)
            check(seed)
        for model in (ours, official):
            model.prompt_encoder.no_mask_embed.weight.add_(0.25)
        check(6)
        assert len(prepared) == 5
        predictor.set_image(image)
        reference.set_image(image)
        check(7)
        assert len(prepared) == 6


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predictor_and_generator_keep_the_image_side(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """The predictor's clicks and the generator's batches on one image prepare its side
    once."""
    model, _ = make_model_pair("tiny", seed=11)
    prepared = _count_prepared_images(monkeypatch)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    predictor = SamPredictor(model, precision=precision)
    predictor.set_image(image)
    for x in (10, 20, 30):
        predictor.predict(point_coords=np.array([[x, 20]]), point_labels=np.array([1]))
    assert len(prepared) == 1
    generator = SamAutomaticMaskGenerator(
        model, precision=precision, points_per_side=8, points_per_batch=16
    )
    generator.generate(image)
    assert len(prepared) == 2


def _instance_state(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each module's own attributes (its ``__dict__`` keys, parameters and buffers)."""
    return {
        name: sorted([*vars(module), *module._parameters, *module._buffers])
        for name, module in model.named_modules()
    }


def test_the_model_stays_stateless() -> None:
    """Inference leaves nothing on the model's modules (everything it prepares lives in
    the inference layer's objects): their attributes are those they were built with, and
    the model pickles and copies to the same predictions."""
    import copy
    import pickle

    model = build_sam("default")  # the decoder with high-resolution features, BatchNorm
    before = _instance_state(model)
    for precision in ("fp32", "bf16"):
        predictor = SamPredictor(model, precision=precision)
        predictor.set_image(np.zeros((40, 50, 3), np.uint8))
        predictor.predict(point_coords=np.array([[5, 5]]), point_labels=np.array([1]))
        SamAutomaticMaskGenerator(model, precision=precision, points_per_side=4).generate(
            np.zeros((40, 50, 3), np.uint8)
        )
    assert _instance_state(model) == before
    click = {"point_coords": np.array([[5, 5]]), "point_labels": np.array([1])}
    predictor = SamPredictor(model, precision="fp32")
    predictor.set_image(np.zeros((40, 50, 3), np.uint8))
    expected = predictor.predict(**click)[2]
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        again = SamPredictor(clone, precision="fp32")
        again.set_image(np.zeros((40, 50, 3), np.uint8))
        np.testing.assert_allclose(again.predict(**click)[2], expected, atol=1e-5)


def test_prepared_decoder_follows_weight_changes() -> None:
    """The stacked hypernetworks (and all the prepared decoder) are made again after the
    weights change in place (as an optimiser step does); gradients reach the parameters
    through the model itself."""
    ours, official = make_model_pair("tiny", seed=9)
    inference = InferenceModel(ours, resolve_precision("fp32", CPU))
    for step in range(2):
        embedding = _random_decoder_inputs(ours, step, sets=2, points=3)[0]
        points = (torch.rand((2, 3, 2), generator=torch.Generator().manual_seed(step)) * 1024,
                  torch.ones(2, 3, dtype=torch.int))  # fmt: skip
        with torch.no_grad():
            masks, iou = inference.decode(embedding, points, None, None, True)
            sparse, dense = official.prompt_encoder(points=points, boxes=None, masks=None)
            pe = official.prompt_encoder.get_dense_pe()
            expected_masks, expected_iou = official.mask_decoder(embedding, pe, sparse, dense, True)
        torch.testing.assert_close(masks, expected_masks, atol=ATOL, rtol=0)
        torch.testing.assert_close(iou, expected_iou, atol=ATOL, rtol=0)
        for model in (ours, official):
            with torch.no_grad():
                for mlp in model.mask_decoder.output_hypernetworks_mlps:
                    mlp.layers[0].weight.mul_(-2.0)
    embedding, pe, sparse, dense = _random_decoder_inputs(ours, 5, sets=2, points=3)
    masks, _ = ours.mask_decoder(embedding, pe, sparse, dense, True)
    masks.square().mean().backward()
    for mlp in ours.mask_decoder.output_hypernetworks_mlps[1:]:
        assert mlp.layers[0].weight.grad is not None and mlp.layers[2].bias.grad.abs().sum() > 0


def test_cast_copy_follows_the_module() -> None:
    """The bfloat16 decoder copy is made again after an in-place change (at the next
    decode), a replaced parameter and a replaced submodule (when the next image is set);
    compared with the live weights cast anew."""
    model = make_model_pair("tiny", seed=8)[0]
    inference = InferenceModel(model, resolve_precision("bf16", CPU))
    decoder = model.mask_decoder

    def check() -> None:
        for (name, ours), (_, cast) in zip(
            decoder.state_dict().items(), inference.mask_decoder.state_dict().items(), strict=True
        ):
            assert cast.dtype == torch.bfloat16
            assert torch.equal(cast, ours.to(torch.bfloat16)), name

    check()
    with torch.no_grad():
        decoder.iou_token.weight.add_(1.0)
    inference.prepare_image(torch.zeros(1, 256, 64, 64, dtype=torch.bfloat16))
    check()
    decoder.iou_token.weight = torch.nn.Parameter(torch.randn(1, 256))
    assert inference.refresh()
    check()
    decoder.output_hypernetworks_mlps[2].layers[1] = torch.nn.Linear(256, 256)
    assert inference.refresh() and not inference.refresh()
    check()


def test_batchnorm_folding_equals_the_model() -> None:
    """The folded encoder copy computes the model's encoder (BatchNorm in eval mode) and
    shares its other weights; a weight change reaches it after a refresh."""
    model = build_sam("default").eval()
    inference = InferenceModel(model, resolve_precision("fp32", CPU))
    assert inference.encoder is not model.image_encoder
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inference.encoder.modules())
    images = torch.randn((1, 3, 512, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):
            expected, _ = model.encode_image(images)
            got, _ = inference.encode(images)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            norm = next(
                m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)
            )
            norm.running_var.mul_(2.0)
            assert inference.refresh()


def test_cost_model_picks_shared_projection_for_big_batches() -> None:
    attention = Attention(256, 8, downsample_rate=2)
    assert fold_image_projection(attention, batch=1, image_batch=1, tokens=7)
    assert not fold_image_projection(attention, batch=64, image_batch=1, tokens=7)
    assert fold_image_projection(attention, batch=64, image_batch=64, tokens=7)
    assert not fold_image_projection(attention, batch=1, image_batch=1, tokens=40)


# -------------------------------------------------------------------------------------
# Image encoder: attention with the relative-position bias in chunks of query rows
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_products", [False, True], ids=["fused", "products"])
def test_chunked_attention_equals_official(monkeypatch: pytest.MonkeyPatch, by_products) -> None:
    """A bias budget of a few rows (uneven last chunk) gives the official embedding, and no
    chunk ever materialises more bias than the budget, through the fused kernel and
    through explicit products alike."""
    ours, official = make_model_pair("tiny", seed=2)
    budget = 7 * 2 * 4096 * 4  # 7 rows of 2 heads x 4096 keys in float32
    for block in ours.image_encoder.blocks:
        block.attn.max_bias_bytes = budget
    biggest = []
    original = image_encoder.expand_rel_pos_bias

    def spy(rel_h, rel_w):
        bias = original(rel_h, rel_w)
        biggest.append(bias.numel() * bias.element_size())
        return bias

    monkeypatch.setattr(image_encoder, "expand_rel_pos_bias", spy)
    monkeypatch.setattr(image_encoder, "_attention_by_products_is_faster", lambda q: by_products)
    image = torch.randn((1, 3, 1024, 1024), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours.image_encoder(image)
        expected = official.image_encoder(image)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    assert max(biggest) <= budget
    assert len(biggest) > 4096 // 7  # the global block really ran in chunks


def test_rel_pos_attention_chunks_equal_one_pass() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn((2, 3, 30, 8), generator=g) for _ in range(3))
    tables = torch.randn((11, 8), generator=g), torch.randn((11, 8), generator=g)
    whole = image_encoder.rel_pos_attention(q, k, v, *tables, (5, 6), max_bias_bytes=2**30)
    rel_h, rel_w = image_encoder.decomposed_rel_pos_terms(q, *tables, (5, 6), (5, 6))
    bias = image_encoder.expand_rel_pos_bias(rel_h, rel_w)
    # Independent reference: the textbook formula with the bias in one piece.
    scores = q @ k.transpose(-1, -2) / 8**0.5 + bias
    torch.testing.assert_close(whole, scores.softmax(-1) @ v, atol=1e-6, rtol=1e-6)
    for rows in (1, 4, 29):
        budget = rows * 2 * 3 * 30 * 4
        chunked = image_encoder.rel_pos_attention(q, k, v, *tables, (5, 6), budget)
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
        by_products = image_encoder._attention_by_products(q, k, v, rel_h, rel_w, rows)
        torch.testing.assert_close(by_products, whole, atol=1e-6, rtol=1e-6)


# -------------------------------------------------------------------------------------
# Predictor: mask upscaling in one banded pass per axis, the cached positional encoding
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_size,original_size",
    [((768, 1024), (480, 640)), ((1024, 768), (500, 375)), ((1024, 1024), (77, 77)),
     ((1024, 683), (1024, 683)), ((3, 1024), (5, 1700)), ((1024, 1), (900, 1)),
     ((1024, 683), (1500, 1000))],
)  # fmt: skip
def test_fast_upscaling_equals_official_postprocessing(
    input_size: tuple[int, int], original_size: tuple[int, int]
) -> None:
    _, official = make_model_pair("tiny")
    official.image_encoder.img_size = 1024  # postprocess_masks reads only this
    low_res = 20 * torch.randn((2, 3, 256, 256), generator=torch.Generator().manual_seed(9))
    expected = official.postprocess_masks(low_res, input_size, original_size)
    got = upscale_logits_fast(low_res, 1024, input_size, original_size)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-6)


def test_grid_encoding_follows_its_matrix() -> None:
    """The grid encoding the inference layer keeps equals the official one, also after
    the Fourier matrix changes in place."""
    ours, official = make_model_pair("tiny", seed=6)
    inference = InferenceModel(ours, resolve_precision("fp32", CPU))
    for _ in range(2):
        inference.prepare_image(torch.zeros(1, 256, 64, 64))  # checks the weights
        torch.testing.assert_close(inference.image_pe, official.prompt_encoder.get_dense_pe())
        with torch.no_grad():
            ours.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(1.5)
        official.load_state_dict(ours.state_dict())


# -------------------------------------------------------------------------------------
# torch.compile
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_encoder_matches_official(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """Compiled, fp32 equals the official embedding; bf16 is within its bound and keeps
    the explicit-products attention (the fused CPU kernel is slow in bfloat16)."""
    ours, official = make_model_pair("tiny", seed=9)
    products = []
    real_products = image_encoder._attention_by_products

    def counted(*args, **kwargs):
        products.append(args[0].dtype)
        return real_products(*args, **kwargs)

    monkeypatch.setattr(image_encoder, "_attention_by_products", counted)
    image = _real_image(shared_data)
    predictor = SamPredictor(ours, precision=precision, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor.set_image(image)
    # Compiling must work here; the one fallback allowed is the check against eager mode
    # (PyTorch's inductor computes NaN with its kernels held to AVX2, the AVX2 stand-in).
    if not predictor.inference.encoder.is_compiled:
        assert any("disagrees with eager mode" in str(w.message) for w in caught), caught
    else:
        assert not caught, [str(w.message) for w in caught]
    reference = _official_predictor(official)
    reference.set_image(image)
    embedding, expected = predictor.get_image_embedding(), reference.get_image_embedding()
    if precision == "fp32":
        torch.testing.assert_close(embedding, expected, atol=ATOL, rtol=1e-4)
        assert not products
    else:
        assert 1e-5 < _relative_error(embedding, expected) < 0.02
        assert products


@pytest.mark.parametrize("wrong", [float("nan"), 0.01])
def test_compiled_code_that_disagrees_with_eager_is_dropped(monkeypatch, wrong: float) -> None:
    ours, _ = make_model_pair("tiny", seed=9)
    calls = []

    def miscompiled(module):
        def run(x):
            calls.append(x.shape)
            out = module(x)
            return out + wrong * out.abs().mean() if wrong == wrong else out * wrong

        return run

    monkeypatch.setattr(torch, "compile", miscompiled)
    predictor = SamPredictor(ours, precision="fp32", compile=True)
    image = np.zeros((40, 60, 3), np.uint8)
    with pytest.warns(UserWarning, match="disagrees with eager mode"):
        predictor.set_image(image)
    assert not predictor.inference.encoder.is_compiled
    eager = SamPredictor(ours, precision="fp32")
    eager.set_image(image)
    torch.testing.assert_close(predictor.get_image_embedding(), eager.get_image_embedding())
    predictor.set_image(image)  # from now on in eager mode only
    assert len(calls) == 1


def test_compiled_code_that_agrees_is_checked_once_per_shape(monkeypatch) -> None:
    ours, _ = make_model_pair("tiny", seed=9)
    eager_calls = []
    encoder_forward = type(ours.image_encoder).forward

    def counting(self, x):
        eager_calls.append(x.shape)
        return encoder_forward(self, x)

    monkeypatch.setattr(torch, "compile", lambda module: module)  # "compiled" = itself
    monkeypatch.setattr(type(ours.image_encoder), "forward", counting)
    predictor = SamPredictor(ours, precision="fp32", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    assert predictor.inference.encoder.is_compiled
    assert len(eager_calls) == 4  # 3 calls + 1 eager check of the first


def test_compile_failure_falls_back_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    ours, _ = make_model_pair("tiny", seed=9)

    def broken_compile(module):
        def run(x):
            raise RuntimeError("no C++ compiler\nlong details")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    predictor = SamPredictor(ours, precision="fp32", compile=True)
    image = np.zeros((40, 60, 3), np.uint8)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler\\); running the image encoder"):
        predictor.set_image(image)
    eager = SamPredictor(ours, precision="fp32")
    eager.set_image(image)
    torch.testing.assert_close(predictor.get_image_embedding(), eager.get_image_embedding())


# -------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    return path


def _spy(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[dict]:
    """Record the keyword arguments each ``module.name`` (a class) is built with."""
    calls: list[dict] = []
    real = getattr(module, name)

    class Recorder(real):
        # The everything command reads the generator's defaults from its signature.
        __signature__ = inspect.signature(real)

        def __init__(self, *args, **kwargs) -> None:
            calls.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, name, Recorder)
    return calls


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "fp32", "--compile"]])
def test_segment_passes_precision(flags, tmp_path, image_path, checkpoint, monkeypatch) -> None:
    calls = _spy(monkeypatch, common, "SamPredictor")  # built for the model's family there
    monkeypatch.setattr(inference_model, "compiled", lambda module: module)  # compiling is slow
    out = tmp_path / "mask.png"
    args = ["segment", str(image_path), "--point", "40,30", "--checkpoint", str(checkpoint)]
    assert main([*args, "-o", str(out), "--device", "cpu", *flags]) == 0
    assert calls == [{"precision": flags[1], "compile": "--compile" in flags}]
    assert out.is_file()


def test_everything_and_eval_pass_precision(tmp_path, monkeypatch, checkpoint) -> None:
    generators = _spy(monkeypatch, sam2_automatic_mask_generator, "SamAutomaticMaskGenerator")
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(image)
    args = ["everything", str(image), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint)]
    assert main([*args, "--points-per-side", "2", "--precision", "bf16"]) == 0
    assert generators[0]["precision"] == "bf16" and generators[0]["compile"] is False
    # eval, on a stand-in data set and evaluation: only the plumbing is under test.
    predictors = _spy(monkeypatch, common, "SamPredictor")
    monkeypatch.setattr(eval_command, "load_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(common, "model_from_args", lambda args: make_model_pair()[0])
    monkeypatch.setattr(eval_command, "evaluate", _stop)
    with pytest.raises(_Stop):
        main(["eval", "--data", str(tmp_path), "--precision", "fp32", "--device", "cpu"])
    assert predictors == [{"precision": "fp32", "compile": False}]


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize(
    "flags,message",
    [(["--precision", "fp64"], "invalid choice: 'fp64'"), (["--precision", "fp16"], "CUDA")],
)
def test_bad_precision_exits_2(flags, message, tmp_path, image_path, capsys) -> None:
    args = ["segment", str(image_path), "--point", "1,1", "-o", str(tmp_path / "m.png"), *flags]
    try:
        status = main([*args, "--device", "cpu"])
    except SystemExit as stop:  # argparse rejects unknown choices itself
        status = stop.code
    assert status == 2
    assert message in capsys.readouterr().err

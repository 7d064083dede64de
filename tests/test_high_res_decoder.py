"""Mask decoders with high-resolution features (SAM 2's; segany's ``default`` model v2).

The reference is Meta's ``sam2`` package: its ``MaskDecoder(use_high_res_features=True)``
with the same random weights must give segany's masks and scores, and every path that
serves a model (predictor, saved embeddings, ONNX export, the mask generator, training)
must carry the features to the decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from reference import randomize_
from sam2.modeling.sam.mask_decoder import MaskDecoder as Sam2MaskDecoder
from sam2.modeling.sam.transformer import TwoWayTransformer as Sam2Transformer

from segany import SamAutomaticMaskGenerator, SamPredictor
from segany.build import (
    EfficientEncoderConfig,
    SamConfig,
    build_sam_from_config,
    config_to_dict,
    load_model,
    save_model,
)
from segany.checkpoint import read_metadata
from segany.errors import SeganyError
from segany.modeling import Sam
from segany.onnx_export import export_onnx
from segany.onnx_predictor import OnnxSamPredictor
from segany.train import load_config, train
from segany.train.trainer import PROGRESS_METADATA_KEY, training_progress

# A small EfficientNet-Lite-style encoder at 256 px: 1/4 and 1/8 taps of 8 and 16 channels.
TINY_STAGES = (
    (1, 3, 1, 8, 1),
    (4, 3, 2, 8, 1),
    (4, 3, 2, 16, 1),
    (4, 3, 2, 24, 1),
    (4, 3, 2, 32, 1),
)
TINY_HIGH_RES = SamConfig(
    EfficientEncoderConfig(TINY_STAGES),
    img_size=256,
    decoder_mlp_dim=256,
    high_res_features=True,
)


def _image(height: int = 180, width: int = 240, seed: int = 0) -> np.ndarray:
    """A photo-like image: smooth shapes, so masks are neither empty nor full."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(15, 60)
        image[(ys - cy) ** 2 + (xs - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model() -> Sam:
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(TINY_HIGH_RES), seed=1).eval()


def official_decoder(model: Sam) -> Sam2MaskDecoder:
    """sam2's decoder with ``model``'s decoder weights (same parameter names)."""
    config = TINY_HIGH_RES
    decoder = Sam2MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=Sam2Transformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_heads,
        ),
        num_multimask_outputs=3,
        use_high_res_features=True,
    )
    # sam2 names the transformer MLPs' layers ``layers.0/1`` (SAM: ``lin1/lin2``), and its
    # conv_s0/conv_s1 take its FPN's 256 channels: they run outside the decoder's forward
    # (when the image is set), as segany's Sam.encode_image runs them.
    renamed = {
        key.replace("mlp.lin1", "mlp.layers.0").replace("mlp.lin2", "mlp.layers.1"): value
        for key, value in model.mask_decoder.state_dict().items()
        if not key.startswith(("conv_s0.", "conv_s1."))
    }
    missing, unexpected = decoder.load_state_dict(renamed, strict=False)
    assert not unexpected and all(key.startswith(("conv_s0.", "conv_s1.")) for key in missing)
    return decoder.eval()


def official_masks(
    model: Sam,
    image: np.ndarray,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    box: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference pipeline: segany's encoder features (tested apart), SAM's prompt
    encoder, sam2's decoder, SAM's post-processing written out (pad, crop, resize)."""
    from segany.transforms import ResizeLongestSide

    size = model.image_size
    transform = ResizeLongestSide(size)
    resized = transform.apply_image(image)
    pixels = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        embedding, high_res = model.encode_image(model.preprocess(pixels))
        if points is not None:
            points = (transform.apply_coords_torch(points[0], image.shape[:2]), points[1])
        if box is not None:
            box = transform.apply_boxes_torch(box, image.shape[:2])
        sparse, dense = model.prompt_encoder(points=points, boxes=box, masks=mask_input)
        low_res, iou, _, _ = official_decoder(model)(
            embedding,
            model.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output=multimask,
            repeat_image=True,
            high_res_features=high_res,
        )
        masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : resized.shape[0], : resized.shape[1]]
        masks = F.interpolate(masks, image.shape[:2], mode="bilinear", align_corners=False)
    return masks[0].numpy(), iou[0].numpy(), low_res[0].numpy()


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("per_set_features", [False, True], ids=["shared", "per-set"])
def test_decoder_matches_sam2(model, multimask: bool, per_set_features: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    dim, grid, sets = 256, 16, 5  # 5 sets: more than one chunk of the decoder's batching
    embedding = torch.randn(1, dim, grid, grid, generator=generator)
    batch = sets if per_set_features else 1
    high_res = [
        torch.randn(batch, dim // 8, 4 * grid, 4 * grid, generator=generator),
        torch.randn(batch, dim // 4, 2 * grid, 2 * grid, generator=generator),
    ]
    points = (torch.rand(sets, 3, 2, generator=generator) * 256, torch.ones(sets, 3).long())
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
        pe = model.prompt_encoder.get_dense_pe()
        masks, iou = model.mask_decoder(
            embedding, pe, sparse, dense, multimask, high_res_features=high_res
        )
        expected_masks, expected_iou, _, _ = official_decoder(model)(
            embedding, pe, sparse, dense, multimask, repeat_image=True, high_res_features=high_res
        )
    torch.testing.assert_close(masks, expected_masks, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, expected_iou, atol=1e-5, rtol=0)
    # The features matter: without them (zeros) the masks differ.
    zeros = [torch.zeros_like(f) for f in high_res]
    with torch.no_grad():
        other, _ = model.mask_decoder(
            embedding, pe, sparse, dense, multimask, high_res_features=zeros
        )
    assert (other - masks).abs().max() > 1e-2


def test_decoder_refuses_missing_or_unexpected_features(model) -> None:
    sparse, dense = model.prompt_encoder(
        points=None, boxes=torch.tensor([[10.0, 10, 90, 90]]), masks=None
    )
    embedding = torch.zeros(1, 256, 16, 16)
    with pytest.raises(ValueError, match="needs high_res_features"):
        model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, False)


def test_encoder_features_are_the_backbone_taps_projected(model) -> None:
    """encode_image's features: the last block at stride 4 and 8, through conv_s0/conv_s1."""
    encoder = model.image_encoder
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        taps, h = [], encoder.stem(x)
        for block in encoder.blocks:
            h = block(h)
            taps.append(h)
        strides = [
            2 * np.prod([b.depthwise[0].stride[0] for b in encoder.blocks[: i + 1]])
            for i in range(len(taps))
        ]
        fine = taps[max(i for i, s in enumerate(strides) if s == 4)]
        medium = taps[max(i for i, s in enumerate(strides) if s == 8)]
        embedding, high_res = model.encode_image(x)
        torch.testing.assert_close(embedding, encoder(x))
        torch.testing.assert_close(
            high_res[0], model.mask_decoder.conv_s0(fine), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            high_res[1], model.mask_decoder.conv_s1(medium), atol=1e-5, rtol=1e-5
        )
    assert high_res[0].shape == (1, 32, 64, 64) and high_res[1].shape == (1, 64, 32, 32)


PROMPTS = {
    "click": {"point_coords": np.array([[120.0, 90.0]]), "point_labels": np.array([1])},
    "box": {"box": np.array([40.0, 30.0, 200.0, 150.0])},
    "clicks and box": {
        "point_coords": np.array([[120.0, 90.0], [60.0, 40.0]]),
        "point_labels": np.array([1, 0]),
        "box": np.array([40.0, 30.0, 200.0, 150.0]),
    },
}


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("multimask", [True, False])
def test_predictor_matches_the_reference_pipeline(model, prompt: str, multimask: bool) -> None:
    image = _image()
    predictor = SamPredictor(model, precision="fp32")
    predictor.set_image(image)
    kwargs = PROMPTS[prompt]
    masks, scores, low_res = predictor.predict(
        **kwargs, multimask_output=multimask, return_logits=True
    )
    points = None
    if "point_coords" in kwargs:
        points = (
            torch.as_tensor(kwargs["point_coords"])[None].float(),
            torch.as_tensor(kwargs["point_labels"])[None],
        )
    box = torch.as_tensor(kwargs["box"])[None].float() if "box" in kwargs else None
    expected = official_masks(model, image, points, box, None, multimask)
    np.testing.assert_allclose(masks, expected[0], atol=1e-4)
    np.testing.assert_allclose(scores, expected[1], atol=1e-5)
    # With the previous logits as the mask prompt.
    again = predictor.predict(
        **kwargs, mask_input=low_res[:1], multimask_output=multimask, return_logits=True
    )
    expected = official_masks(
        model, image, points, box, torch.as_tensor(low_res[:1])[None], multimask
    )
    np.testing.assert_allclose(again[0], expected[0], atol=1e-4)
    assert 0.02 < (masks > 0).mean() < 0.98


def test_saved_embedding_needs_its_features(model) -> None:
    image = _image(seed=2)
    first = SamPredictor(model, precision="fp32")
    first.set_image(image)
    expected = first.predict(**PROMPTS["box"])
    second = SamPredictor(model, precision="fp32")
    with pytest.raises(SeganyError, match="high-resolution features"):
        second.set_image_embedding(first.get_image_embedding(), image.shape[:2])
    second.set_image_embedding(
        first.get_image_embedding(), image.shape[:2], [f.numpy() for f in first.high_res_features]
    )
    got = second.predict(**PROMPTS["box"])
    assert np.array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_batch_of_images_keeps_each_images_features(model) -> None:
    images = [_image(seed=3), _image(150, 200, seed=4)]
    batch = SamPredictor(model, precision="fp32")
    batch.set_image_batch(images, batch_size=1)
    boxes = [PROMPTS["box"]["box"]] * 2
    got = batch.predict_batch(box_batch=boxes, multimask_output=False, return_logits=True)
    for index, image in enumerate(images):
        single = SamPredictor(model, precision="fp32")
        single.set_image(image)
        expected = single.predict(box=boxes[index], multimask_output=False, return_logits=True)
        np.testing.assert_allclose(got[0][index], expected[0], atol=1e-4)


def test_bf16_decoder_takes_the_features(model) -> None:
    """The reduced-precision decoder copy gets the features in its dtype (masks close)."""
    image = _image(seed=5)
    exact, reduced = SamPredictor(model, precision="fp32"), SamPredictor(model, precision="bf16")
    for predictor in (exact, reduced):
        predictor.set_image(image)
    a = exact.predict(**PROMPTS["clicks and box"], multimask_output=False)[0]
    b = reduced.predict(**PROMPTS["clicks and box"], multimask_output=False)[0]
    assert np.logical_and(a, b).sum() / np.logical_or(a, b).sum() > 0.9


def test_automatic_masks_decode_with_the_features(model) -> None:
    """The generator's masks are the predictor's masks for the same single-point prompts."""
    image = _image(seed=6)
    generator = SamAutomaticMaskGenerator(
        model,
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )
    records = generator.generate(image)
    assert records
    predictor = SamPredictor(model, precision=generator.predictor.precision.name)
    predictor.set_image(image)
    for record in records[:3]:
        masks, scores, _ = predictor.predict(
            point_coords=np.array(record["point_coords"]), point_labels=np.array([1])
        )
        best = np.argmin(np.abs(scores - record["predicted_iou"]))
        agreement = np.logical_and(masks[best], record["segmentation"]).sum() / max(
            1, np.logical_or(masks[best], record["segmentation"]).sum()
        )
        assert agreement > 0.99


def test_onnx_export_carries_the_features(model, tmp_path: Path) -> None:
    result = export_onnx(model, tmp_path / "onnx", model_name="tiny-high-res")
    assert result.info.high_res_features
    assert max(result.max_abs_diff.values()) < 1e-3
    image = _image(seed=7)
    reference = SamPredictor(model, precision="fp32")
    reference.set_image(image)
    onnx = OnnxSamPredictor(tmp_path / "onnx")
    onnx.set_image(image)
    for prompt in PROMPTS.values():
        expected = reference.predict(**prompt, return_logits=True)
        got = onnx.predict(**prompt, return_logits=True)
        np.testing.assert_allclose(got[0], expected[0], atol=1e-3)
        np.testing.assert_allclose(got[1], expected[1], atol=1e-4)
    # An embedding (and its features) from the PyTorch predictor.
    reuse = OnnxSamPredictor(tmp_path / "onnx")
    with pytest.raises(SeganyError, match="high_res_features"):
        reuse.set_image_embedding(reference.get_image_embedding().numpy(), image.shape[:2])
    reuse.set_image_embedding(
        reference.get_image_embedding().numpy(),
        image.shape[:2],
        [f.numpy() for f in reference.high_res_features],
    )
    np.testing.assert_allclose(
        reuse.predict(**PROMPTS["box"], return_logits=True)[0],
        reference.predict(**PROMPTS["box"], return_logits=True)[0],
        atol=1e-3,
    )


def test_saved_model_loads_with_its_features(model, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m.safetensors", TINY_HIGH_RES)
    loaded = load_model(checkpoint=path)
    assert loaded.mask_decoder.use_high_res_features
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# -- training in chunks --------------------------------------------------------------


def write_config(folder: Path, shared_data: Path, steps: int, continue_from: Path | None) -> Path:
    config = {
        "model": {
            "name": None,
            "config": config_to_dict(TINY_HIGH_RES),
            "continue_from": None if continue_from is None else str(continue_from),
        },
        "data": {
            "train": [{"root": str(shared_data / "coco-mval"), "split": "train"}],
            "masks_per_image": 3,
        },
        "optim": {"steps": steps, "batch_images": 2, "lr": 1e-3, "warmup_steps": 2, "rounds": 2},
        "output": str(folder / "run"),
        "log_every": 1,
        "checkpoint_every": 100,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_training_continues_from_the_last_chunk(tmp_path: Path, shared_data: Path) -> None:
    chunk = tmp_path / "chunk.safetensors"
    (tmp_path / "a").mkdir()
    first = load_config(write_config(tmp_path / "a", shared_data, 2, chunk))
    path = train(first, progress=False)
    progress = training_progress(path)
    assert progress is not None and (progress.step, progress.chunks) == (2, 1)
    assert progress.hours > 0 and progress.cpus
    # The high-resolution projections were trained too.
    state = load_model(checkpoint=path).state_dict()
    assert state["mask_decoder.conv_s0.weight"].abs().sum() > 0
    # What gets committed between sessions: the weights in fp16, progress kept.
    from segany.cli import main

    assert main(["weights", "convert", str(path), "--dtype", "fp16", "-o", str(chunk)]) == 0
    assert training_progress(chunk) == training_progress(path)

    (tmp_path / "b").mkdir()  # another machine: no checkpoint.pt, only the weights file
    second = load_config(write_config(tmp_path / "b", shared_data, 4, chunk))
    path = train(second, progress=False)
    progress = training_progress(path)
    assert progress is not None and (progress.step, progress.chunks) == (4, 2)
    logged = [
        json.loads(line)["step"]
        for line in (second.output / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [2, 3]  # it went on from step 2
    assert PROGRESS_METADATA_KEY in read_metadata(path)


def test_max_minutes_stops_and_saves_where_it_got(tmp_path: Path, shared_data: Path) -> None:
    config = load_config(write_config(tmp_path, shared_data, 50, None))
    path = train(config, progress=False, max_minutes=1e-9)  # stops before any step
    progress = training_progress(path)
    assert progress is not None and progress.step == 0
    assert (config.output / "checkpoint.pt").is_file()


def test_web_tool_caches_the_features_with_the_embedding(model, tmp_path: Path) -> None:
    """The annotation server keeps embeddings in memory and on disk: a model with
    high-resolution features must get them back from either cache."""
    from segany.serve.segmenter import Segmenter

    image = _image(seed=8)
    reference = SamPredictor(model, precision="fp32")
    reference.set_image(image)
    expected = reference.predict(**PROMPTS["clicks and box"])
    prompt = PROMPTS["clicks and box"]
    for expected_source in ("computed", "memory", "disk"):
        if expected_source != "memory":  # "disk": a new server process on the same folder
            segmenter = Segmenter(model, cache_dir=tmp_path)
        masks, scores, source, _ = segmenter.predict(
            "key", lambda: image, prompt["point_coords"], prompt["point_labels"], prompt["box"]
        )
        assert source == expected_source
        assert np.array_equal(masks, expected[0])
        np.testing.assert_allclose(scores, expected[1], atol=1e-6)

"""ONNX export of SAM 2 models and the ONNX Runtime predictor on them.

The reference is segany's ``Sam2ImagePredictor`` in fp32, which tests/test_sam2_predictor.py
proves equal to Meta's ``SAM2ImagePredictor`` (1e-4). The model is a small SAM 2
(:data:`SMALL`: a 4-block Hiera at 256 px, SAM 2.1's heads): the official tiny takes
about a minute to export on a busy 2-core machine, this one half of that, and nothing in
the export depends on the sizes. Its mask logits are sharpened as in
tests/sam2_reference.py (more: this model's are flatter), so that SAM 2's single-mask
choice goes both ways.

Measured (2 busy CPU cores): the NumPy resize equals PyTorch's antialiased interpolation
bit for bit on these sizes; the embedding within 1.3e-6 of PyTorch's; on the same
embedding, mask logits within 1.9e-4 (7e-6 of their largest magnitude, 32), scores within
6e-8, low-res logits within 3e-5; end to end, masks IoU >= 0.99994, scores within 6e-8;
uint8 weights against float32, masks IoU 0.968-0.995. The whole file runs in about 90 s
(the export through the command line, about 50 s, is most of it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from sam2_reference import photo

from segany import SeganyError
from segany.checkpoint import read_state_dict
from segany.cli import main
from segany.commands import export as export_command
from segany.modeling.sam2 import SAM2_CONFIGS, Sam2
from segany.modeling.sam2_configs import Sam2EncoderConfig
from segany.onnx.export import export_decoder, quantize
from segany.onnx.format import (
    DECODER_FILE,
    ENCODER_FILE,
    HIGH_RES_FEATURES,
    METADATA_FILE,
    DecoderOptions,
    ModelInfo,
    decoder_inputs,
)
from segany.onnx.predictor import OnnxSamPredictor, resize_square
from segany.sam2_predictor import Sam2ImagePredictor

# SAM 2.1's heads (prompt encoder, decoder, dynamic single mask) on a small Hiera at 256 px:
# a 16 x 16 embedding, 64 x 64 low-res masks.
SMALL_ENCODER = Sam2EncoderConfig(
    embed_dim=16,
    num_heads=1,
    stages=(1, 1, 2, 1),
    global_att_blocks=(3,),
    window_spec=(8, 4, 4, 2),
    window_pos_embed_bkg_spatial_size=(7, 7),
)
SMALL = dataclasses.replace(SAM2_CONFIGS["sam2.1_hiera_t"], encoder=SMALL_ENCODER, image_size=256)
# Not square: the squashing resize shrinks the width (antialiasing counts) and stretches
# the height.
HEIGHT, WIDTH = 180, 400
# Random weights give mask logits within +-1, whose single masks are never stable; scaled
# up this much, some prompts' single masks are stable and some are not (as
# sam2_reference.LOGIT_SCALE does for the official tiny model).
LOGIT_SCALE = 60.0
# Decoder logits then reach about 30, and the rounding differences of the decoder's
# attention grow with them: logits are compared to 1e-4 or 3e-5 of their largest
# magnitude, whichever is larger (measured: 7e-6 of it).
LOGIT_TOLERANCE = 1e-4
RELATIVE_LOGIT_TOLERANCE = 3e-5

PROMPTS = {
    "click": {"point_coords": np.array([[250.0, 90.0]]), "point_labels": np.array([1])},
    "clicks": {
        "point_coords": np.array([[250.0, 90.0], [60.0, 150.0], [380.0, 20.0]]),
        "point_labels": np.array([1, 0, 1]),
    },
    "box": {"box": np.array([120.0, 40.0, 330.0, 170.0])},
    "clicks and box": {
        "point_coords": np.array([[250.0, 90.0], [140.0, 60.0]]),
        "point_labels": np.array([1, 0]),
        "box": np.array([120.0, 40.0, 330.0, 170.0]),
    },
}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    return float(np.abs(actual - expected).max())


def _assert_logits_close(actual: np.ndarray, expected: np.ndarray) -> None:
    tolerance = max(LOGIT_TOLERANCE, RELATIVE_LOGIT_TOLERANCE * float(np.abs(expected).max()))
    difference = _max_difference(actual, expected)
    assert difference <= tolerance, f"max |difference| {difference:.2e} > {tolerance:.2e}"


# -------------------------------------------------------------------------------------
# The model, its export (through the command line) and the two predictors
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Sam2:
    """:data:`SMALL` with random weights, mask logits sharpened by LOGIT_SCALE."""
    from reference import randomize_

    torch.manual_seed(0)
    model = randomize_(Sam2.from_config(SMALL), seed=0).eval()
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(LOGIT_SCALE)
    return model


@pytest.fixture(scope="module")
def checkpoint(model: Sam2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's weights in Meta's checkpoint layout."""
    path = tmp_path_factory.mktemp("meta") / "small_sam2.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def export_run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``segany export --checkpoint small_sam2.pt -o DIR``: (DIR, what it printed).

    ``load_model`` reads the architecture of official checkpoints only (``segany export
    --checkpoint sam2.1_hiera_tiny.pt`` builds the official tiny, which tests/
    test_sam2_loading.py covers); here it builds :data:`SMALL` and loads the file given."""
    out = tmp_path_factory.mktemp("sam2-onnx")
    calls = []

    def load_small(name: str | None, path: str | None, device: str) -> Sam2:
        calls.append((name, path, device))
        small = Sam2.from_config(SMALL).eval()
        small.load_state_dict(read_state_dict(path))
        return small

    with pytest.MonkeyPatch.context() as patch, _captured() as printed:
        patch.setattr(export_command, "load_model", load_small)
        assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    assert calls == [(None, str(checkpoint), "cpu")]
    return out, printed.getvalue()


def _captured():
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


@pytest.fixture(scope="module")
def model_dir(export_run: tuple[Path, str]) -> Path:
    return export_run[0]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return photo(HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def reference(model: Sam2, image: np.ndarray) -> Sam2ImagePredictor:
    """segany's PyTorch predictor in fp32 (Meta's numbers) with :func:`image` set."""
    predictor = Sam2ImagePredictor(model, precision="fp32")
    predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def onnx_predictor(model_dir: Path, image: np.ndarray) -> OnnxSamPredictor:
    predictor = OnnxSamPredictor(model_dir)
    predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def same_embedding(model_dir: Path, reference: Sam2ImagePredictor) -> OnnxSamPredictor:
    """The ONNX predictor on the reference's own embedding: the decoder graph alone."""
    features = reference._features
    predictor = OnnxSamPredictor(model_dir)
    predictor.set_image_embedding(
        features["image_embed"].numpy(),
        (HEIGHT, WIDTH),
        [f.numpy() for f in features["high_res_feats"]],
    )
    return predictor


# -------------------------------------------------------------------------------------
# The folder
# -------------------------------------------------------------------------------------


def test_cli_export_writes_a_sam2_folder(export_run, model: Sam2) -> None:
    directory, printed = export_run
    assert sorted(p.name for p in directory.iterdir()) == [DECODER_FILE, ENCODER_FILE, "model.json"]
    assert "exported float32" in printed and "encoder: max |ONNX Runtime - PyTorch|" in printed
    info = json.loads((directory / METADATA_FILE).read_text())
    assert info["format"] == "segany-onnx" and info["format_version"] == 2
    assert info["checkpoint"] == "small_sam2.pt"
    assert info["family"] == "sam2" and info["resize"] == "square"
    assert info["normalized_input"] is True and info["pixel_scale"] == 255.0
    assert info["pixel_mean"] == [0.485, 0.456, 0.406]
    assert info["pixel_std"] == [0.229, 0.224, 0.225]
    assert info["img_size"] == 256 and info["embedding_shape"] == [1, 256, 16, 16]
    assert info["mask_input_size"] == [64, 64] and info["high_res_features"] is True
    assert info["dynamic_multimask_stability"] == [0.05, 0.98]
    loaded = ModelInfo.load(directory)
    assert ModelInfo.from_dict(json.loads(loaded.to_json())) == loaded
    # The graphs' interfaces: SAM 2's model input, and the official decoder interface
    # with the high-resolution features after the embedding.
    encoder = ort.InferenceSession(str(directory / ENCODER_FILE))
    assert [(i.name, i.shape) for i in encoder.get_inputs()] == [("image", [1, 3, 256, 256])]
    assert [o.name for o in encoder.get_outputs()] == ["image_embeddings", *HIGH_RES_FEATURES]
    decoder = ort.InferenceSession(str(directory / DECODER_FILE))
    assert [i.name for i in decoder.get_inputs()] == list(decoder_inputs(True))


def test_old_model_json_reads_as_sam(model_dir: Path) -> None:
    """A model.json written before SAM 2 (no family etc.) keeps SAM's conventions."""
    data = json.loads((model_dir / METADATA_FILE).read_text())
    for key in ("family", "resize", "normalized_input", "pixel_scale"):
        del data[key]
    del data["dynamic_multimask_stability"]
    data["format_version"] = 1
    info = ModelInfo.from_dict(data)
    assert (info.family, info.resize, info.normalized_input) == ("sam", "longest_side", False)
    assert info.pixel_scale == 1.0 and info.dynamic_multimask_stability is None


# -------------------------------------------------------------------------------------
# Encoder: preprocessing in NumPy, the graph
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(HEIGHT, WIDTH), (600, 1200, 1024), (37, 500), (300, 200)])
def test_numpy_resize_is_pytorchs_antialiased_resize(size: tuple[int, ...]) -> None:
    """Shrinking, stretching, both at once and a large factor: PyTorch's bilinear
    interpolation with antialiasing, the resize of Sam2.preprocess (measured: equal)."""
    height, width, *target = size
    side = target[0] if target else 256
    pixels = photo(height, width, seed=1).astype(np.float32) / np.float32(255)
    expected = F.interpolate(
        torch.from_numpy(pixels).permute(2, 0, 1)[None],
        (side, side),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].permute(1, 2, 0)
    assert _max_difference(resize_square(pixels, side), expected.numpy()) <= 1e-6


def test_encoder_input_is_sam2_preprocessing(
    onnx_predictor: OnnxSamPredictor, model: Sam2, image: np.ndarray
) -> None:
    expected = model.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None]).numpy()
    assert _max_difference(onnx_predictor.encoder_input(image), expected) <= 1e-6


def test_encoder_matches_pytorch(model_dir: Path, model: Sam2) -> None:
    """The embedding (with no_mem_embed) and the projected high-resolution features."""
    session = ort.InferenceSession(str(model_dir / ENCODER_FILE))
    images = torch.randn((1, 3, 256, 256), generator=torch.Generator().manual_seed(1))
    got = session.run(None, {"image": images.numpy()})
    with torch.no_grad():
        embedding, high_res = model.encode_image(images)
    expected = [embedding, *high_res]
    assert [g.shape for g in got] == [(1, 256, 16, 16), (1, 32, 64, 64), (1, 64, 32, 32)]
    for g, e in zip(got, expected, strict=True):
        assert _max_difference(g, e.numpy()) <= 1e-4


# -------------------------------------------------------------------------------------
# Decoder: exact on the same embedding
# -------------------------------------------------------------------------------------


def _options(reference: Sam2ImagePredictor, prompt: dict) -> list[dict]:
    """Multimask on and off, without and with a mask input from an earlier prediction."""
    previous = reference.predict(**prompt)[2][:1]
    return [
        {"multimask_output": True},
        {"multimask_output": False},
        {"multimask_output": True, "mask_input": previous},
        {"multimask_output": False, "mask_input": previous},
    ]


def test_decoder_matches_sam2_predictor_on_the_same_embedding(
    reference: Sam2ImagePredictor, same_embedding: OnnxSamPredictor
) -> None:
    """Every prompt kind, multimask on/off, mask input on/off (and a mask input alone):
    logits, scores and clamped low-res logits equal (measured: see the module docstring).
    SAM 2's single-mask choice goes both ways among these (the stable token 0, and the
    best multimask output)."""
    cases = [(p, o) for p in PROMPTS.values() for o in _options(reference, p)]
    cases.append(({}, {"mask_input": reference.predict(**PROMPTS["box"])[2][:1]}))
    multimask_scores, single_is_token_0, fractions = [], [], []
    for prompt, options in cases:
        expected = reference.predict(**prompt, **options, return_logits=True)
        got = same_embedding.predict(**prompt, **options, return_logits=True)
        _assert_logits_close(got[0], expected[0])
        assert _max_difference(got[1], expected[1]) <= 1e-5
        _assert_logits_close(got[2], expected[2])
        fractions += [(m > 0).mean() for m in expected[0]]
        # _options gives each multimask case right before its single-mask twin.
        if options.get("multimask_output", True):
            multimask_scores = expected[1]
        else:
            single_is_token_0.append(not np.isin(expected[1], multimask_scores).any())
    assert any(single_is_token_0) and not all(single_is_token_0), single_is_token_0
    assert 0.02 < np.median(fractions) < 0.98  # masks neither empty nor full


def test_thresholded_masks_are_sam2s(
    reference: Sam2ImagePredictor, same_embedding: OnnxSamPredictor
) -> None:
    """Without return_logits: float32 0/1 masks, as SAM 2's predictors return them."""
    for multimask_output in (True, False):
        prompt = {**PROMPTS["clicks and box"], "multimask_output": multimask_output}
        masks, expected = same_embedding.predict(**prompt)[0], reference.predict(**prompt)[0]
        assert masks.dtype == expected.dtype == np.float32 and set(np.unique(masks)) <= {0, 1}
        assert np.mean(masks != expected) <= 1e-4  # pixels with a logit within 1e-4 of 0


def test_single_mask_decoder_graph(
    model: Sam2, reference: Sam2ImagePredictor, tmp_path: Path
) -> None:
    """--return-single-mask for SAM 2 puts SAM 2's choice in the graph: its one output is
    the predictor's multimask_output=False mask."""
    path = tmp_path / DECODER_FILE
    export_decoder(model, path, DecoderOptions(return_single_mask=True))
    session = ort.InferenceSession(str(path))
    features = reference._features
    for prompt in PROMPTS.values():
        expected = reference.predict(**prompt, multimask_output=False, return_logits=True)
        coords, labels = _sam2_prompt(prompt)
        masks, scores, low_res = session.run(
            None,
            {
                "image_embeddings": features["image_embed"].numpy(),
                **{n: f.numpy() for n, f in zip(HIGH_RES_FEATURES, features["high_res_feats"])},
                "point_coords": coords,
                "point_labels": labels,
                "mask_input": np.zeros((1, 1, 64, 64), np.float32),
                "has_mask_input": np.zeros(1, np.float32),
                "orig_im_size": np.array([HEIGHT, WIDTH], np.float32),
            },
        )
        _assert_logits_close(masks[0], expected[0])
        assert _max_difference(scores[0], expected[1]) <= 1e-5
        _assert_logits_close(low_res[0], expected[2])


def _sam2_prompt(prompt: dict) -> tuple[np.ndarray, np.ndarray]:
    """A prompt as SAM 2's decoder inputs, written out independently of the predictor:
    box corners (2, 3), clicks, one padding point; x * 256 / W, y * 256 / H."""
    coords, labels = [], []
    if "box" in prompt:
        coords += prompt["box"].reshape(2, 2).tolist()
        labels += [2, 3]
    if "point_coords" in prompt:
        coords += prompt["point_coords"].tolist()
        labels += prompt["point_labels"].tolist()
    coords.append([0.0, 0.0])
    labels.append(-1)
    scaled = np.array(coords, np.float32) / np.array([WIDTH, HEIGHT], np.float32) * 256
    return scaled[None].astype(np.float32), np.array([labels], np.float32)


# -------------------------------------------------------------------------------------
# End to end: image in, masks out
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_predictor_matches_sam2_predictor(
    reference: Sam2ImagePredictor, onnx_predictor: OnnxSamPredictor, prompt: str
) -> None:
    """From the image: NumPy resize + both graphs against PyTorch (measured IoU >= 0.99994)."""
    embedding = reference.get_image_embedding().numpy()
    assert _max_difference(onnx_predictor.get_image_embedding(), embedding) <= 1e-4
    for options in _options(reference, PROMPTS[prompt]):
        expected = reference.predict(**PROMPTS[prompt], **options)
        got = onnx_predictor.predict(**PROMPTS[prompt], **options)
        assert got[0].shape == expected[0].shape == (len(expected[1]), HEIGHT, WIDTH)
        for a, b in zip(got[0], expected[0], strict=True):
            assert _iou(a, b) >= 0.99
        assert _max_difference(got[1], expected[1]) <= 1e-3
        assert _max_difference(got[2], expected[2]) <= 1e-2


def test_quantized_sam2_export(
    model_dir: Path, onnx_predictor: OnnxSamPredictor, image: np.ndarray, tmp_path: Path
) -> None:
    """uint8 weights (the generic --quantize path) on both graphs: smaller, masks close
    to float32's (measured IoU 0.968-0.995 on these random weights; 0.971-0.996 for the
    official tiny architecture, 110 MB -> 29 MB encoder, 21 MB -> 9 MB decoder)."""
    for name in (ENCODER_FILE, DECODER_FILE):
        quantize(model_dir / name, tmp_path / name)
        assert (tmp_path / name).stat().st_size < 0.7 * (model_dir / name).stat().st_size
    shutil.copy(model_dir / METADATA_FILE, tmp_path)
    quantized = OnnxSamPredictor(tmp_path)
    quantized.set_image(image)
    ious = []
    for prompt in PROMPTS.values():
        full = onnx_predictor.predict(**prompt)[0]
        ious += [_iou(a, b) for a, b in zip(full, quantized.predict(**prompt)[0], strict=True)]
    assert min(ious) > 0.9, ious


# -------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------


def test_predictor_bad_input(model_dir: Path, onnx_predictor: OnnxSamPredictor) -> None:
    predictor = OnnxSamPredictor(model_dir)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(**PROMPTS["box"])
    with pytest.raises(SeganyError, match="needs the image's high_res_features"):
        predictor.set_image_embedding(np.zeros((1, 256, 16, 16), np.float32), (HEIGHT, WIDTH))
    with pytest.raises(SeganyError, match=r"mask_input must have shape \(1, 64, 64\)"):
        onnx_predictor.predict(**PROMPTS["box"], mask_input=np.zeros((1, 256, 256)))
    with pytest.raises(SeganyError, match="outside"):
        onnx_predictor.predict(point_coords=[[WIDTH + 5, 10]], point_labels=[1])


def test_unknown_family_or_newer_format(model_dir: Path, tmp_path: Path) -> None:
    for key, value, message in (
        ("family", "sam3", "family is 'sam3'"),
        ("format_version", 3, "newer segany"),
    ):
        data = json.loads((model_dir / METADATA_FILE).read_text())
        data[key] = value
        (tmp_path / METADATA_FILE).write_text(json.dumps(data))
        with pytest.raises(SeganyError, match=message) as error:
            OnnxSamPredictor(tmp_path)
        assert "\n" not in str(error.value)


def test_cli_export_bad_option_with_sam2(tmp_path: Path, capsys) -> None:
    """Fails before the model loads (nothing downloaded): one line, exit code 2."""
    argv = ["export", "--model", "sam2.1_t", "--opset", "17", "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("segany export: error: --opset must be"), err

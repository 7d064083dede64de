"""ONNX export and the ONNX Runtime predictor, against independent references.

References: the PyTorch model that was exported (encoder outputs, SamPredictor masks),
and the official packages' ``SamOnnxModel`` run in PyTorch on the official model with
the same weights (segment-anything for ViT, mobilesam-mirror for vit_t), which defines
the decoder interface that front ends expect.

Tolerances (measured on 2 CPU cores, ORT 1.32, torch 2.13): encoder embeddings and
decoder logits differ from PyTorch by about 1e-5 (asserted: 1e-4 absolute); predictor
masks agree with IoU >= 0.9999 and scores within 1e-6 (asserted: IoU > 0.999, 1e-3).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from reference import CONFIGS, make_model_pair, randomize_

from segany import SamPredictor, SeganyError, sam_model_registry
from segany.build import build_sam_from_config
from segany.cli import main
from segany.loading import save_model
from segany.onnx import export as onnx_export
from segany.onnx.export import export_decoder, export_onnx, quantize
from segany.onnx.format import DECODER_INPUTS, DecoderOptions, ModelInfo
from segany.onnx.predictor import OnnxSamPredictor

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # logits and embeddings; measured differences are about 1e-5

# Prompt sets in original-image pixels of a 300 x 451 (H x W) image.
PROMPTS = {
    "one point": {"point_coords": [[100, 120]], "point_labels": [1]},
    "points": {"point_coords": [[100, 120], [300, 200], [20, 250]], "point_labels": [1, 0, 1]},
    "box": {"box": [50, 60, 350, 250]},
    "points and box": {
        "point_coords": [[100, 120]],
        "point_labels": [1],
        "box": [50, 60, 350, 250],
    },
    "nothing": {},
}


def _image(height: int = 300, width: int = 451, seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise, so that random models give varied masks."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    return np.clip(ramp + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def _fp32_predictor(model: torch.nn.Module) -> SamPredictor:
    """The PyTorch predictor in float32, the numbers the ONNX graphs reproduce (its default
    precision may be bfloat16 on CPUs that have it)."""
    if "precision" in inspect.signature(SamPredictor).parameters:
        return SamPredictor(model, precision="fp32")
    return SamPredictor(model)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -------------------------------------------------------------------------------------
# Exports shared by the tests (each takes 5-20 s)
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_model_pair("tiny")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_pair, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    return save_model(tiny_pair[0], path, CONFIGS["tiny"])


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model exported through the command line from a checkpoint."""
    out = tmp_path_factory.mktemp("tiny-onnx")
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def vit_t_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_model_pair("vit_t")


@pytest.fixture(scope="module")
def vit_t_dir(vit_t_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vit_t-onnx")
    export_onnx(vit_t_pair[0], out, model_name="vit_t")
    return out


@pytest.fixture(scope="module")
def default_model() -> torch.nn.Module:
    """The ``default`` architecture (BatchNorm, ReLU6, space-to-depth; 512 px) with random
    weights."""
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(CONFIGS["default"]), seed=0).eval()


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory) -> Path:
    """The bundled, trained ``default`` model exported."""
    out = tmp_path_factory.mktemp("bundled-onnx")
    export_onnx(sam_model_registry["default"]().eval(), out, model_name="default")
    return out


@pytest.fixture(scope="module")
def default_dir(default_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default-onnx")
    export_onnx(default_model, out, model_name="default")
    return out


@pytest.fixture(scope="module")
def predictors():
    """(model, folder) -> (SamPredictor, OnnxSamPredictor), both with ``_image()`` set;
    made once per model, since embedding is the slow part."""
    made: dict[Path, tuple[SamPredictor, OnnxSamPredictor]] = {}

    def get(model: torch.nn.Module, directory: Path) -> tuple[SamPredictor, OnnxSamPredictor]:
        if directory not in made:
            pair = _fp32_predictor(model), OnnxSamPredictor(directory)
            for predictor in pair:
                predictor.set_image(_image())
            made[directory] = pair
        return made[directory]

    return get


@pytest.fixture
def exported(request) -> tuple[torch.nn.Module, Path]:
    """(PyTorch model, export folder) for the model named by the test's parameter."""
    name = request.param
    if name == "default":
        return request.getfixturevalue("default_model"), request.getfixturevalue("default_dir")
    return request.getfixturevalue(f"{name}_pair")[0], request.getfixturevalue(f"{name}_dir")


# -------------------------------------------------------------------------------------
# Encoder
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("exported", ["tiny", "vit_t", "default"], indirect=True)
def test_encoder_matches_pytorch(exported) -> None:
    """Dynamic h and w: landscape and portrait resized images, padded inside the graph."""
    model, directory = exported
    session = _session(directory / "encoder.onnx")
    size = model.image_size
    generator = torch.Generator().manual_seed(1)
    for shape in [(size * 2 // 3, size), (size, size // 3 + 1)]:
        image = torch.rand((1, 3, *shape), generator=generator) * 255
        with torch.no_grad():
            expected = model.image_encoder(model.preprocess(image)).numpy()
        got = session.run(None, {"image": image.numpy()})[0]  # then any high-res features
        assert got.shape == expected.shape == (1, 256, size // 16, size // 16)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


# -------------------------------------------------------------------------------------
# Decoder: the official interface
# -------------------------------------------------------------------------------------


def _official_onnx_model(name: str, reference: torch.nn.Module, **options: bool):
    """The official package's SamOnnxModel around the reference model."""
    if name == "vit_t":
        from mobile_sam.utils.onnx import SamOnnxModel
    else:
        from segment_anything.utils.onnx import SamOnnxModel
    return SamOnnxModel(reference, **options).eval()


def _decoder_cases(predictor: SamPredictor) -> list[dict[str, np.ndarray]]:
    """Official-format inputs: points with a padding point, a box, both, nothing; N = 0..20;
    with and without a mask; original sizes of both orientations."""
    size = predictor.model.image_size
    embedding = predictor.get_image_embedding().numpy()  # real: masks of varied sizes
    low_res = predictor.predict(**PROMPTS["points"])[2][:1][None]
    prompts = [
        ([[0.4, 0.3], [0, 0]], [1, -1]),  # one point + padding
        ([[0.2, 0.6], [0.7, 0.1], [0.5, 0.5], [0, 0]], [1, 0, 1, -1]),  # points + padding
        ([[0.1, 0.2], [0.8, 0.7]], [2, 3]),  # box only
        ([[0.3, 0.3], [0.1, 0.2], [0.8, 0.7]], [1, 2, 3]),  # point + box
        # 20 points: past the token counts where the decoder's attention changes order
        ([[x / 20, 1 - x / 20] for x in range(18)] + [[0.1, 0.2], [0.8, 0.7]], [1, 0] * 9 + [2, 3]),
        (np.zeros((0, 2)), []),  # no point at all (mask prompt only)
        ([[0.1, 0.2], [0.8, 0.7]], [2, 3]),  # box only, now with a mask
    ]
    sizes = [(300, 451), (640, 320), (37, 500)]
    return [
        {
            "image_embeddings": embedding,
            "point_coords": (np.asarray(coords, dtype=np.float32) * size)[None],
            "point_labels": np.asarray(labels, dtype=np.float32)[None],
            # Every other case with a mask (including "no point", where it is the prompt).
            "mask_input": low_res * (index % 2),
            "has_mask_input": np.array([index % 2], dtype=np.float32),
            "orig_im_size": np.array(sizes[index % len(sizes)], dtype=np.float32),
        }
        for index, (coords, labels) in enumerate(prompts)
    ]


def _compare_decoder(
    session, reference, cases, names: tuple[str, ...], stability_scores: bool = False
) -> None:
    """ORT outputs equal the reference's; scores counted from pixels (stability) may move by
    a pixel's worth when a logit within 1e-5 of a threshold flips."""
    assert [i.name for i in session.get_inputs()] == list(DECODER_INPUTS)
    assert [o.name for o in session.get_outputs()] == list(names)
    for case in cases:
        got = session.run(None, case)
        with torch.no_grad():
            expected = reference(*(torch.from_numpy(case[name]) for name in DECODER_INPUTS))
        for name, g, e in zip(names, got, expected, strict=True):
            e = e.numpy()
            assert g.shape == e.shape, name
            if name == "areas":  # pixel counts: a logit within 1e-5 of 0 may flip
                np.testing.assert_allclose(g, e, atol=max(5, e.max() * 1e-4), err_msg=name)
            elif name == "stability_scores" or (name == "iou_predictions" and stability_scores):
                np.testing.assert_allclose(g, e, atol=1e-3, err_msg=name)
            else:
                # Rounding grows with the logits' scale; resizing (masks) also differs by
                # ~1e-6 px in sampling positions between ORT and PyTorch, which counts
                # where logits are steep.
                scale = (5e-5 if name == "masks" else 1e-5) * float(np.abs(e).max())
                np.testing.assert_allclose(g, e, atol=max(ATOL, scale), rtol=0, err_msg=name)
        if "masks" in names:
            h, w = case["orig_im_size"].astype(int)
            assert got[0].shape[-2:] == (h, w)


@pytest.mark.parametrize("exported", ["tiny", "vit_t"], indirect=True)
def test_decoder_matches_official_onnx_model(exported, predictors, request) -> None:
    """All four masks (the official export's default), every prompt kind, mask on/off."""
    model, directory = exported
    name = request.node.callspec.params["exported"]
    reference = _official_onnx_model(
        name, request.getfixturevalue(f"{name}_pair")[1], return_single_mask=False
    )
    names = ("masks", "iou_predictions", "low_res_masks")
    cases = _decoder_cases(predictors(model, directory)[0])
    _compare_decoder(_session(directory / "decoder.onnx"), reference, cases, names)


@pytest.fixture(scope="module")
def sharp_tiny_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny pair with 30x larger mask logits, so that stability scores (the share of
    pixels past +/-1 that stay past -1) are neither 0 nor 1."""
    ours, official = make_model_pair("tiny")
    with torch.no_grad():
        for mlp in ours.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 30
            mlp.layers[-1].bias *= 30
    official.load_state_dict(ours.state_dict())
    return ours, official


@pytest.mark.parametrize(
    "options",
    [  # both with a single mask, the option front ends use
        {"return_single_mask": True},
        {"return_single_mask": True, "use_stability_score": True, "return_extra_metrics": True},
    ],
    ids=["single", "stability+metrics"],
)
def test_decoder_options_match_official(sharp_tiny_pair, tmp_path, options) -> None:
    """The official choice of a single mask (multimask best for <= 2 points, else token 0),
    stability scores instead of IoU, and the extra metrics."""
    ours, official = sharp_tiny_pair
    path = tmp_path / "decoder.onnx"
    decoder_options = DecoderOptions(**options)
    export_decoder(ours, path, decoder_options)
    reference = _official_onnx_model(
        "tiny", official, **{"use_stability_score": False, "return_extra_metrics": False, **options}
    )
    names = ("masks", "iou_predictions", "low_res_masks")
    if decoder_options.return_extra_metrics:
        names = ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
    predictor = _fp32_predictor(ours)
    predictor.set_image(_image())
    cases = _decoder_cases(predictor)
    session = _session(path)
    _compare_decoder(session, reference, cases, names, decoder_options.use_stability_score)
    # Both branches of the official choice are compared: N <= 2 (best multimask output)
    # and N > 2 (token 0).
    counts = [case["point_labels"].shape[1] for case in cases]
    assert min(counts) <= 2 < max(counts)
    if decoder_options.use_stability_score:
        scores = np.concatenate([session.run(None, case)[1] for case in cases])
        assert ((scores > 0.01) & (scores < 0.99)).sum() > 2, scores  # not all 0 or 1


# -------------------------------------------------------------------------------------
# ONNX Runtime predictor
# -------------------------------------------------------------------------------------


def _compare_predictions(torch_result, onnx_result) -> None:
    masks, scores, low_res = torch_result
    onnx_masks, onnx_scores, onnx_low_res = onnx_result
    assert onnx_masks.shape == masks.shape and onnx_masks.dtype == masks.dtype
    assert onnx_scores.shape == scores.shape and onnx_low_res.shape == low_res.shape
    if masks.dtype == bool:
        for a, b in zip(masks, onnx_masks):
            assert _iou(a, b) > 0.999
    else:
        np.testing.assert_allclose(onnx_masks, masks, atol=ATOL, rtol=0)
    np.testing.assert_allclose(onnx_scores, scores, atol=1e-3, rtol=0)
    np.testing.assert_allclose(onnx_low_res, low_res, atol=1e-3, rtol=0)


@pytest.mark.parametrize("exported", ["tiny", "vit_t", "default"], indirect=True)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_predictor_matches_pytorch_predictor(exported, predictors, prompt) -> None:
    reference, predictor = predictors(*exported)
    np.testing.assert_allclose(
        predictor.get_image_embedding(), reference.get_image_embedding().numpy(), atol=ATOL
    )
    kwargs = PROMPTS[prompt]
    previous = reference.predict(**kwargs)[2][:1]
    fractions = []
    for options in (
        {"multimask_output": True},
        {"multimask_output": False},
        {"multimask_output": True, "mask_input": previous},
        {"multimask_output": False, "return_logits": True, "mask_input": previous},
    ):
        expected = reference.predict(**kwargs, **options)
        _compare_predictions(expected, predictor.predict(**kwargs, **options))
        fractions.extend((m > 0).mean() for m in expected[0])
    # The comparison means something only if the masks are neither empty nor full.
    assert 0.02 < np.median(fractions) < 0.98


def test_predictor_bgr_and_embedding_reuse(tiny_pair, tiny_dir) -> None:
    image = _image(seed=3)
    reference = _fp32_predictor(tiny_pair[0])
    reference.set_image(image)
    predictor = OnnxSamPredictor(tiny_dir)
    predictor.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    expected = reference.predict(**PROMPTS["points and box"])
    _compare_predictions(expected, predictor.predict(**PROMPTS["points and box"]))
    other = OnnxSamPredictor(tiny_dir)
    other.set_image_embedding(reference.get_image_embedding().numpy(), image.shape[:2])
    _compare_predictions(expected, other.predict(**PROMPTS["points and box"]))


def test_predictor_bad_input(tiny_dir) -> None:
    predictor = OnnxSamPredictor(tiny_dir)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(**PROMPTS["box"])
    with pytest.raises(SeganyError, match="uint8"):
        predictor.set_image(_image().astype(np.float32))
    predictor.set_image(_image())
    with pytest.raises(SeganyError, match="outside"):
        predictor.predict(point_coords=[[1000, 10]], point_labels=[1])
    with pytest.raises(SeganyError, match="label 2"):
        predictor.predict(point_coords=[[10, 10]], point_labels=[2])
    with pytest.raises(SeganyError, match="one box"):
        predictor.predict(box=[[0, 0, 5, 5], [1, 1, 6, 6]])
    with pytest.raises(SeganyError, match="mask_input"):
        predictor.predict(box=[0, 0, 5, 5], mask_input=np.zeros((1, 64, 64)))


def test_predictor_needs_an_export_folder(tmp_path, tiny_dir) -> None:
    with pytest.raises(SeganyError, match=r"model\.json"):
        OnnxSamPredictor(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(SeganyError, match="not a segany ONNX model"):
        OnnxSamPredictor(tmp_path)
    single = tmp_path / "single"
    shutil.copytree(tiny_dir, single)
    info = json.loads((single / "model.json").read_text())
    info["decoder"]["return_single_mask"] = True
    (single / "model.json").write_text(json.dumps(info))
    with pytest.raises(SeganyError, match="return-single-mask"):
        OnnxSamPredictor(single)


# -------------------------------------------------------------------------------------
# Quantisation
# -------------------------------------------------------------------------------------


def _quantized_ious(
    full_dir: Path,
    quantized_dir: Path,
    image: np.ndarray | None = None,
    prompts: tuple[str, ...] = ("points", "box", "points and box"),
) -> list[float]:
    """Mask IoUs between a float32 and a quantised export on non-degenerate masks."""
    image = _image() if image is None else image
    full, quantized = OnnxSamPredictor(full_dir), OnnxSamPredictor(quantized_dir)
    full.set_image(image)
    quantized.set_image(image)
    ious = []
    for prompt in prompts:
        masks, _, _ = full.predict(**PROMPTS[prompt])
        quantized_masks, _, _ = quantized.predict(**PROMPTS[prompt])
        assert all(0.02 < m.mean() < 0.98 for m in masks)  # non-degenerate
        ious.extend(_iou(a, b) for a, b in zip(masks, quantized_masks))
    return ious


def test_quantized_export(tiny_checkpoint, tiny_dir, tmp_path, capsys) -> None:
    """uint8 weights: smaller files, masks close to float32 (measured min IoU 0.97)."""
    out = tmp_path / "q"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--quantize"]) == 0
    printed = capsys.readouterr()
    assert "uint8 quantised" in printed.out and printed.err == ""  # no exporter chatter
    assert ModelInfo.load(out).quantized and not ModelInfo.load(tiny_dir).quantized
    for name in ("encoder.onnx", "decoder.onnx"):
        assert (out / name).stat().st_size < 0.7 * (tiny_dir / name).stat().st_size
    ious = _quantized_ious(tiny_dir, out)
    assert min(ious) > 0.9, ious


def test_quantized_default_model(bundled_dir, tmp_path) -> None:
    """Per-channel scales, with depthwise convolutions left in float, keep the trained conv
    encoder (batch norms folded) usable: the cat in the demo photo from a box, uint8
    against float32 weights (measured IoU 0.87-0.98, mean 0.94; the ViT models lose less)."""
    from skimage import data

    for name in ("encoder.onnx", "decoder.onnx"):
        quantize(bundled_dir / name, tmp_path / name)
    shutil.copy(bundled_dir / "model.json", tmp_path)
    ious = _quantized_ious(bundled_dir, tmp_path, data.chelsea(), ("box", "points and box"))
    assert min(ious) > 0.8 and np.mean(ious) > 0.88, ious


# -------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------


def test_cli_export_writes_model_folder(tiny_dir, tiny_pair) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "model.json",
    ]
    info = json.loads((tiny_dir / "model.json").read_text())
    model = tiny_pair[0]
    assert info["format"] == "segany-onnx" and info["checkpoint"] == "tiny.safetensors"
    assert info["img_size"] == 1024 and info["mask_input_size"] == [256, 256]
    assert info["embedding_shape"] == [1, 256, 64, 64]
    assert info["opset"] == 18 and info["quantized"] is False
    np.testing.assert_allclose(info["pixel_mean"], model.pixel_mean.flatten().numpy())
    np.testing.assert_allclose(info["pixel_std"], model.pixel_std.flatten().numpy())
    assert info["decoder"] == {
        "return_single_mask": False,
        "use_stability_score": False,
        "return_extra_metrics": False,
        "stability_score_offset": 1.0,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--opset", "17"], "--opset must be between 18 and"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--checkpoint", "missing.safetensors"], "missing.safetensors"),
    ],
)
def test_cli_export_bad_input(tmp_path, capsys, args: list[str], message: str) -> None:
    assert main(["export", "-o", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("segany export: error:"), err
    assert message in err[0]


def test_cli_export_names_missing_packages(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(onnx_export, "EXPORT_PACKAGES", ("onnx", "no_such_package_xyz"))
    assert main(["export", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs no_such_package_xyz: pip install 'segany[export]'" in err


def test_cli_export_output_is_a_file(tmp_path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["export", "-o", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_old_module_names_are_the_new_modules() -> None:
    """segany.onnx_export and segany.onnx_predictor (before segany/onnx/) still import,
    as the very modules of the package."""
    import segany.onnx.export
    import segany.onnx.predictor
    import segany.onnx_export
    import segany.onnx_predictor

    assert segany.onnx_export is segany.onnx.export
    assert segany.onnx_predictor is segany.onnx.predictor
    assert segany.OnnxSamPredictor is segany.onnx.OnnxSamPredictor is OnnxSamPredictor


# -------------------------------------------------------------------------------------
# Without PyTorch
# -------------------------------------------------------------------------------------

PREDICT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    try:
        import torch
    except ImportError:
        pass
    else:
        sys.exit("torch is importable")
    import segany
    from segany.onnx import OnnxSamPredictor
    predictor = segany.OnnxSamPredictor(sys.argv[1])
    predictor.set_image(np.load(sys.argv[2]))
    masks, scores, low_res = predictor.predict(**json.loads(sys.argv[3]))
    np.savez(sys.argv[4], masks=masks, scores=scores)
    assert "torch" not in sys.modules
    """
)


def _predict_in(
    python: str, tiny_dir: Path, tmp_path: Path, env: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Masks and scores of PREDICT_SCRIPT run by ``python`` on ``_image()``."""
    image_file = tmp_path / "image.npy"
    np.save(image_file, _image())
    result_file = tmp_path / "result.npz"
    prompt = PROMPTS["points and box"]
    subprocess.run(
        [
            python,
            "-c",
            PREDICT_SCRIPT,
            str(tiny_dir),
            str(image_file),
            json.dumps(prompt),
            str(result_file),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    return dict(np.load(result_file))


def test_onnx_extra_installs_and_predicts_without_torch(
    tiny_dir, tiny_pair, predictors, tmp_path
) -> None:
    """A fresh venv with `pip install segany[onnx]` from this checkout: no torch, predicts."""
    source = tmp_path / "src-copy"  # a copy, so that the build leaves no files in the checkout
    shutil.copytree(
        REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}[onnx]"],
        check=True,
        env=env,
    )
    got = _predict_in(python, tiny_dir, tmp_path, env)
    masks, scores, _ = predictors(tiny_pair[0], tiny_dir)[0].predict(**PROMPTS["points and box"])
    assert _iou(got["masks"], masks) > 0.999
    np.testing.assert_allclose(got["scores"], scores, atol=1e-3)
    # The command line needs torch: one line saying what to install, exit code 2.
    cli = subprocess.run(
        [str(venv / "bin" / "segany"), "segment", "photo.jpg", "--point", "1,1", "-o", "m.png"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        "segany: error: the command line needs PyTorch, which is not installed: "
        "pip install 'segany[torch]' (the 'onnx' extra alone gives segany.OnnxSamPredictor "
        "in Python)"
    ]

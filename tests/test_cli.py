"""The ``segany`` command line: segment and weights, end to end and with bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany import SamPredictor
from segany.build import load_model
from segany.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(path)
    return path


def test_segment_writes_masks_overlay_and_json(tmp_path, image_path, checkpoint, capsys) -> None:
    out = tmp_path / "out" / "mask.png"
    args = [
        "segment",
        str(image_path),
        "--point",
        "40,30",
        "--point",
        "100,60,0",
        "--box",
        "10,5,150,85",
        "--multimask",
        "--checkpoint",
        str(checkpoint),
        "-o",
        str(out),
        "--overlay",
        str(tmp_path / "over.png"),
        "--json",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    written = [Path(m["path"]) for m in result["masks"]]
    assert [p.name for p in written] == ["mask-0.png", "mask-1.png", "mask-2.png"]
    # The masks equal a direct predictor call on the same model and prompts.
    predictor = SamPredictor(load_model(checkpoint=checkpoint))
    predictor.set_image(np.asarray(Image.open(image_path)))
    masks, scores, _ = predictor.predict(
        np.array([[40, 30], [100, 60]]), np.array([1, 0]), np.array([10, 5, 150, 85])
    )
    for mask, record, path in zip(masks, result["masks"], written):
        assert np.array_equal(np.asarray(Image.open(path)) > 0, mask)
        assert record["area"] == int(mask.sum())
    best = int(np.argmax(scores))
    assert result["best"]["score"] == pytest.approx(float(scores[best]), abs=1e-6)
    assert np.array_equal(np.asarray(Image.open(out)) > 0, masks[best])
    assert Image.open(tmp_path / "over.png").size == (160, 90)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--point", "1,2,3,4"], "--point expects X,Y or X,Y,LABEL, got '1,2,3,4'"),
        (["--point", "a,b"], "--point expects X,Y or X,Y,LABEL"),
        (["--point", "10,10,2"], "point label 2 is not allowed"),
        (["--point", "500,10"], "point (500, 10) is outside the 160x90 image"),
        (["--point", "nan,10"], "NaN"),
        (["--box", "50,10,20,40"], "x1 < x0"),
        (["--box", "1,2,3"], "--box expects X0,Y0,X1,Y1"),
        (["--box", "1,2,3,4", "--box", "1,2,3,4"], "at most one --box"),
        ([], "give at least one --point"),
        (["--point", "1,1", "--model", "vit_q"], "unknown model 'vit_q'"),
        (["--point", "1,1", "--checkpoint", "/no/ckpt.pth"], "checkpoint not found"),
        (["--point", "1,1", "--device", "tpu9"], "unknown device"),
    ],
)
def test_segment_bad_input(tmp_path, image_path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "m.png"
    assert main(["segment", str(image_path), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_wrong_checkpoint_for_model(tmp_path, image_path, checkpoint, capsys) -> None:
    code = main(
        [
            "segment",
            str(image_path),
            "--point",
            "1,1",
            "--model",
            "vit_b",
            "--checkpoint",
            str(checkpoint),
            "-o",
            str(tmp_path / "m.png"),
        ]
    )
    assert code == 2
    assert "it looks like a 'vit_t' checkpoint: use --model vit_t" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["missing.jpg", "notes.txt"])
def test_segment_unreadable_image(tmp_path, capsys, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("hello")
    assert main(["segment", str(path), "--point", "1,1", "-o", str(tmp_path / "m.png")]) == 2
    assert str(path) in capsys.readouterr().err


def test_output_must_be_png(tmp_path, image_path, capsys) -> None:
    assert main(["segment", str(image_path), "--point", "1,1", "-o", str(tmp_path / "m.jpg")]) == 2
    assert "-o must be a .png file" in capsys.readouterr().err


def test_weights_commands(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path))
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "sam_vit_h" in listing and "mobile_sam" in listing and "not downloaded" in listing
    assert main(["weights", "path", "sam_vit_b"]) == 1
    assert capsys.readouterr().out.strip().startswith(str(tmp_path))
    assert main(["weights", "path", "sam_vit_q"]) == 2
    assert "unknown checkpoint 'sam_vit_q'" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path) -> None:
    """The installed entry point: exit code 2 and one line for bad input."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "segany.cli",
            "segment",
            str(tmp_path / "none.png"),
            "--point",
            "1,1",
            "-o",
            str(tmp_path / "m.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"segany segment: error: image not found: {tmp_path / 'none.png'}"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_weights_convert(tmp_path, checkpoint, capsys, dtype: str) -> None:
    import torch

    out = tmp_path / "converted.safetensors"
    assert main(["weights", "convert", str(checkpoint), "-o", str(out), "--dtype", dtype]) == 0
    original = torch.load(checkpoint, weights_only=True)
    converted = load_model(checkpoint=out).state_dict()  # architecture read from the file
    # MobileSAM's file also holds TinyViT's unused classifier head, which SAM drops.
    assert set(converted) == {
        k
        for k in original
        if not k.startswith("image_encoder.head") and not k.startswith("image_encoder.norm_head")
    }
    for key, tensor in converted.items():
        expected = original[key]
        if dtype == "fp16" and expected.is_floating_point():
            expected = expected.half().float()
        assert torch.equal(tensor, expected), key
    original_bytes = sum(t.numel() * t.element_size() for t in converted.values())
    expected_bytes = original_bytes / 2 if dtype == "fp16" else original_bytes
    assert abs(out.stat().st_size - expected_bytes) < 0.02 * original_bytes


@pytest.mark.parametrize(
    ("output", "extra", "message"),
    [
        ("w.pt", [], "must end in .safetensors"),
        ("exists.safetensors", [], "exists; pass --overwrite"),
        ("w.safetensors", ["--model", "vit_q"], "unknown model 'vit_q'"),
    ],
)
def test_weights_convert_bad_input(
    tmp_path, checkpoint, capsys, output: str, extra: list[str], message: str
) -> None:
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    code = main(["weights", "convert", str(checkpoint), "-o", str(tmp_path / output), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.safetensors").exists()


def test_weights_convert_missing_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "w.safetensors"
    assert main(["weights", "convert", str(tmp_path / "none.pth"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0], err
    assert not out.exists()

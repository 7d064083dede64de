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
from segany.cli import main
from segany.loading import load_model

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


# -------------------------------------------------------------------------------------
# Hardening (issue 20): outputs checked before any work, written all or nothing; bad
# configs, server options and cached checkpoints are one-line errors
# -------------------------------------------------------------------------------------


def _one_error_line(capsys: pytest.CaptureFixture, command: str, *parts: str) -> str:
    """The single stderr line of a failed command, checked to name ``parts``."""
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and err[0].startswith(f"segany {command}: error: "), err
    assert all(part in err[0] for part in parts), err
    return err[0]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model (or starting the work of engine, export, weights convert) fails
    the test: the commands below must stop before it."""
    import segany.commands.common
    import segany.commands.engine
    import segany.commands.export
    import segany.loading

    def reached(*args, **kwargs):
        raise AssertionError("the work started before the outputs were checked")

    monkeypatch.setattr(segany.commands.common, "load_model", reached)
    monkeypatch.setattr(segany.commands.export, "load_model", reached)
    monkeypatch.setattr(segany.loading, "load_model_and_config", reached)
    monkeypatch.setattr(segany.commands.engine, "run_auto", reached)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("where", ["unwritable", "under_a_file"])
@pytest.mark.parametrize("option", ["-o", "--overlay"])
def test_segment_unwritable_output_exits_2_before_model_runs(
    tmp_path, image_path, unwritable_dir, capsys, no_work, where: str, option: str
) -> None:
    (tmp_path / "file.txt").write_text("a file, not a folder")
    bad = unwritable_dir / "m.png" if where == "unwritable" else tmp_path / "file.txt" / "m.png"
    out = tmp_path / "out"
    outputs = {"-o": str(out / "mask.png"), "--overlay": str(out / "overlay.png"), option: str(bad)}
    argv = ["segment", str(image_path), "--point", "5,5", "--multimask"]
    assert main([*argv, "-o", outputs["-o"], "--overlay", outputs["--overlay"]]) == 2
    _one_error_line(capsys, "segment", f"cannot write {option}", str(bad))
    assert not out.exists()  # not even the mask when only the overlay is bad


def test_segment_outputs_are_all_or_nothing(tmp_path, image_path, checkpoint, monkeypatch) -> None:
    """The overlay failing while it is written (a full disk, say) leaves no mask either."""
    import segany.commands.segment as segment

    def full_disk(path, picture):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segment, "write_image", full_disk)
    out = tmp_path / "out"
    argv = ["segment", str(image_path), "--point", "40,30", "--multimask", "--device", "cpu",
            "--checkpoint", str(checkpoint), "-o", str(out / "m.png"),
            "--overlay", str(out / "o.png")]  # fmt: skip
    with pytest.raises(OSError, match="No space left"):
        main(argv)
    assert _files(out) == []  # no mask, no candidate, no temporary file
    monkeypatch.undo()
    assert main(argv) == 0
    assert sorted(p.name for p in _files(out)) == [
        "m-0.png",
        "m-1.png",
        "m-2.png",
        "m.png",
        "o.png",
    ]


def test_segment_overlay_may_not_overwrite_a_mask(tmp_path, image_path, capsys, no_work) -> None:
    argv = ["segment", str(image_path), "--point", "5,5", "--multimask", "-o"]
    assert main([*argv, str(tmp_path / "m.png"), "--overlay", str(tmp_path / "m-1.png")]) == 2
    _one_error_line(capsys, "segment", "would overwrite a mask")


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    """A COCO folder with one 40x30 image and one polygon."""
    folder = tmp_path / "coco"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(folder / "images" / "a.png")
    (folder / "annotations.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}],
                "annotations": [
                    {"id": 1, "image_id": 1, "segmentation": [[2, 2, 30, 2, 30, 20, 2, 20]]}
                ],
            }
        )
    )
    return folder


@pytest.mark.parametrize(
    "command",
    [
        ["everything", "{images}", "-o", "{bad}/out"],
        ["engine", "auto", "{images}", "-o", "{bad}/out", "--in-process"],
        ["export", "-o", "{bad}/onnx"],
        ["weights", "convert", "{checkpoint}", "-o", "{bad}/w.safetensors"],
        ["eval", "--data", "{coco}", "--plot", "{bad}/curve.png", "--device", "cpu"],
    ],
    ids=["everything", "engine-auto", "export", "weights-convert", "eval-plot"],
)
@pytest.mark.parametrize("where", ["unwritable", "under_a_file"])
def test_unwritable_output_exits_2_before_the_work(
    tmp_path, image_path, checkpoint, tiny_coco, unwritable_dir, capsys, no_work,
    command: list[str], where: str,
) -> None:  # fmt: skip
    (tmp_path / "file.txt").write_text("a file, not a folder")
    bad = unwritable_dir if where == "unwritable" else tmp_path / "file.txt"
    values = {"images": str(image_path.parent), "bad": str(bad), "checkpoint": str(checkpoint),
              "coco": str(tiny_coco)}  # fmt: skip
    argv = [part.format(**values) for part in command]
    assert main(argv) == 2
    _one_error_line(capsys, argv[0], "cannot write", str(bad))


def test_error_messages_stay_on_one_line(tmp_path, capsys) -> None:
    """A line break in an argument (a file name, say) is shown escaped."""
    assert main(["segment", str(tmp_path / "a\nb.png"), "--point", "1,1", "-o", "m.png"]) == 2
    _one_error_line(capsys, "segment", "a\\nb.png")


@pytest.mark.parametrize(
    "content",
    [
        bytes(range(256)) * 4,  # binary
        Image.new("RGB", (4, 4)).tobytes() + b"\x89PNG\r\n\x1a\n\0\0",  # an image
        "data:\n  train: [{synthetic: shapes}]\n".encode("utf-16-le"),  # UTF-16 without BOM
        "data: [1, 2]\noutput: run\n".encode("utf-16"),  # UTF-16 with BOM: read, then checked
        b"data: 5\noutput: run\n",  # a value of the wrong type
        b"data:\n  train: [{synthetic: shapes}]\noptim: {steps: .nan}\noutput: run\n",
    ],
    ids=["binary", "image", "utf16-no-bom", "utf16-bom", "wrong-type", "nan-steps"],
)
def test_train_bad_config_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch, content) -> None:
    import segany.commands.train

    monkeypatch.setattr(segany.commands.train, "train", lambda *a, **k: pytest.fail("trained"))
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    assert main(["train", str(path)]) == 2
    _one_error_line(capsys, "train", str(path))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-3"])
def test_serve_max_upload_mb_must_be_finite_and_positive(
    tmp_path, capsys, no_work, value: str
) -> None:
    argv = ["serve", "--project", str(tmp_path / "p"), f"--max-upload-mb={value}"]
    assert main(argv) == 2
    _one_error_line(capsys, "serve", "--max-upload-mb must be a positive number")


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--max-everything-prompts=0", "--max-everything-prompts must be at least 1"),
        ("--max-queued-jobs=-1", "--max-queued-jobs must be at least 0"),
    ],
)
def test_serve_work_limits_must_be_sensible(tmp_path, capsys, no_work, flag, message) -> None:
    assert main(["serve", "--project", str(tmp_path / "p"), flag]) == 2
    _one_error_line(capsys, "serve", message)


def test_serve_busy_port_exits_2_before_model_loads(tmp_path, capsys, no_work) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--project", str(tmp_path / "p"), "--port", str(port)]
        assert main(argv) == 2
    _one_error_line(capsys, "serve", f"cannot listen on http://127.0.0.1:{port}/", "--port")


def test_serve_unresolvable_host_exits_2_before_model_loads(tmp_path, capsys, no_work) -> None:
    argv = ["serve", "--project", str(tmp_path / "p"), "--host", "no-such-host.invalid"]
    assert main(argv) == 2
    _one_error_line(capsys, "serve", "--host 'no-such-host.invalid'", "does not resolve")


def test_serve_unwritable_project_exits_2(unwritable_dir, capsys, no_work) -> None:
    assert main(["serve", "--project", str(unwritable_dir / "project")]) == 2
    _one_error_line(capsys, "serve", "cannot write --project")


def test_corrupt_cached_checkpoint_is_named_on_first_use(
    tmp_path, image_path, monkeypatch, capsys
) -> None:
    """A zero-filled mobile_sam.pt of the right size: not a torch error but what to do."""
    from segany import weights

    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    path = weights.weights_path("mobile_sam")
    path.parent.mkdir(parents=True)
    with open(path, "wb") as handle:  # sparse: all zeros, the right size
        handle.truncate(weights.get_info("mobile_sam").size_bytes)
    assert main(["weights", "list"]) == 0
    captured = capsys.readouterr()
    listed = next(line for line in captured.out.splitlines() if line.startswith("mobile_sam"))
    assert "corrupt" in listed and "downloaded" not in listed.replace("not downloaded", "")
    assert "segany weights download mobile_sam --force" in captured.err
    argv = ["segment", str(image_path), "--point", "5,5", "--model", "vit_t", "-o"]
    assert main([*argv, str(tmp_path / "m.png")]) == 2
    _one_error_line(capsys, "segment", f"{path} is corrupt", "download mobile_sam --force")


def test_segment_pixel_bomb_exits_2_before_decoding(tmp_path, capsys, no_work) -> None:
    """Issue 20's 12000 x 12000 16-bit TIFF of under 1 MB: one line, no 4.5 GB."""
    from test_images import write_tiled_tiff

    bomb = write_tiled_tiff(tmp_path / "bomb.tif", 12000, 12000)
    assert main(["segment", str(bomb), "--point", "5,5", "-o", str(tmp_path / "m.png")]) == 2
    _one_error_line(capsys, "segment", "144,000,000 pixels", "SEGANY_MAX_IMAGE_PIXELS=")


def test_eval_never_reads_a_coco_file_name_outside_the_data(
    tmp_path, tiny_coco, capsys, no_work
) -> None:
    """A file_name climbing out of --data (to a file that exists) is skipped and reported."""
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "secret.png")
    document = json.loads((tiny_coco / "annotations.json").read_text())
    document["images"][0]["file_name"] = "../../secret.png"
    (tiny_coco / "annotations.json").write_text(json.dumps(document))
    assert main(["eval", "--data", str(tiny_coco), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert "leaves the data folder" in err[0] and "'../../secret.png'" in err[0], err
    assert err[1].startswith("segany eval: error: no annotated images found"), err

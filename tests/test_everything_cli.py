"""``segany everything`` end to end, with the designed stub model of test_amg_parity (fast,
deterministic masks) standing in for a loaded checkpoint. Outputs are checked against the
official generator run on the same images and against pycocotools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
from test_amg_parity import stub_models

from segany import cli
from segany.commands import common
from segany.images import read_image

IMAGES = ["000000000724.jpg", "000000001675.jpg"]
# fp32: the stub decoder hashes point coordinates, which bfloat16 would scramble.
OPTIONS = ["--points-per-side", "6", "--pred-iou-thresh", "0.8", "--stability-score-thresh", "0.9",
           "--precision", "fp32"]  # fmt: skip
GENERATOR_OPTIONS = {"points_per_side": 6, "pred_iou_thresh": 0.8, "stability_score_thresh": 0.9}


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace model loading by the stub model; records each load's arguments."""
    calls: list[tuple] = []

    def fake_load_model(name: str | None, checkpoint: str | None, device: str | None):
        calls.append((name, checkpoint, device))
        return stub_models()[0]

    monkeypatch.setattr(common, "load_model", fake_load_model)
    return calls


@pytest.fixture
def inputs(tmp_path: Path, shared_data: Path) -> Path:
    """A folder with two real photos (reduced, for speed), a broken .jpg and a text file."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in IMAGES:
        with Image.open(shared_data / "coco-mval" / "images" / name) as photo:
            photo.reduce(2).save(folder / name, quality=95)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def official_records(path: Path, output_mode: str) -> list[dict]:
    """The official generator's records on the same pixels with the same stub model."""
    _, official_model = stub_models()
    generator = OfficialGenerator(official_model, output_mode=output_mode, **GENERATOR_OPTIONS)
    return generator.generate(read_image(path))


def _key(record: dict) -> tuple:
    return (tuple(record["point_coords"][0]), record["predicted_iou"])


def _run(*argv: str) -> int:
    return cli.main(["everything", *argv])


def test_sa1b_folder_with_unreadable_image(
    inputs: Path, tmp_path: Path, loads: list, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert _run(str(inputs), "-o", str(out), *OPTIONS, "--device", "cpu") == 1
    captured = capsys.readouterr()
    # One line on stderr for the broken file, and it is listed in the summary.
    assert [line for line in captured.err.splitlines() if "broken.jpg" in line] == [
        line for line in captured.err.splitlines() if line.strip()
    ]
    assert len(captured.err.strip().splitlines()) == 1
    assert "3 image(s): 2 segmented" in captured.out and "1 unreadable" in captured.out
    assert f"unreadable: {inputs / 'broken.jpg'}" in captured.out
    assert loads == [(None, None, "cpu")]
    assert sorted(p.name for p in out.iterdir()) == ["000000000724.json", "000000001675.json"]

    for name in IMAGES:
        doc = json.loads((out / f"{Path(name).stem}.json").read_text())
        image = read_image(inputs / name)
        assert doc["image"] == {
            "image_id": int(Path(name).stem),
            "file_name": name,
            "width": image.shape[1],
            "height": image.shape[0],
        }
        expected = sorted(official_records(inputs / name, "coco_rle"), key=_key)
        anns = sorted(doc["annotations"], key=_key)
        assert len(anns) == len(expected) > 0
        for ann, ref in zip(anns, expected, strict=True):
            assert ann["segmentation"] == ref["segmentation"]
            assert ann["bbox"] == ref["bbox"] and ann["area"] == ref["area"]
            assert ann["predicted_iou"] == ref["predicted_iou"]
            assert ann["stability_score"] == ref["stability_score"]
            assert ann["crop_box"] == ref["crop_box"]
            assert ann["point_coords"] == ref["point_coords"]
            rle = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
            assert int(mask_utils.area(rle)) == ann["area"]


def test_no_mask_passing_the_filters_gives_a_hint(
    inputs: Path, tmp_path: Path, loads: list, capsys: pytest.CaptureFixture
) -> None:
    image = inputs / IMAGES[0]
    options = [*OPTIONS, "--pred-iou-thresh", "1.0"]  # nothing passes
    assert _run(str(image), "-o", str(tmp_path / "out"), *options) == 0
    captured = capsys.readouterr()
    assert "1 segmented (0 masks)" in captured.out
    assert "no mask passed the quality filters (predicted IoU > 1.0, stability >= 0.9)" in (
        captured.err
    )
    # Masks found, or filters off: no hint.
    assert _run(str(image), "-o", str(tmp_path / "out2"), *OPTIONS) == 0
    assert "quality filters" not in capsys.readouterr().err


def test_rerun_skips_finished_images(
    inputs: Path, tmp_path: Path, loads: list, capsys: pytest.CaptureFixture
) -> None:
    (inputs / "broken.jpg").unlink()
    out = tmp_path / "out"
    assert _run(str(inputs), "-o", str(out), *OPTIONS) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()

    assert _run(str(inputs), "-o", str(out), *OPTIONS) == 0
    assert "2 already done" in capsys.readouterr().out
    assert len(loads) == 1, "no model is loaded when everything is finished"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first

    (out / "000000001675.json").unlink()
    assert _run(str(inputs), "-o", str(out), *OPTIONS) == 0
    assert "1 segmented" in capsys.readouterr().out
    assert (out / "000000001675.json").exists()
    assert (out / "000000000724.json").stat().st_mtime_ns == first["000000000724.json"]

    # An image is finished only when all requested outputs exist.
    assert _run(str(inputs), "-o", str(out), *OPTIONS, "--overlay") == 0
    assert "2 segmented" in capsys.readouterr().out
    assert (out / "000000000724.overlay.jpg").exists()
    assert len(loads) == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_coco_format_assembles_all_images(
    inputs: Path, tmp_path: Path, loads: list, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert _run(str(inputs), "-o", str(out), "--format", "coco", *OPTIONS) == 1
    coco = COCO(str(out / "instances.json"))
    assert sorted(coco.getImgIds()) == [724, 1675]
    for name in IMAGES:
        image_id = int(Path(name).stem)
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=_key)
        expected = sorted(official_records(inputs / name, "binary_mask"), key=_key)
        assert len(anns) == len(expected) > 0
        for ann, ref in zip(anns, expected, strict=True):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), ref["segmentation"])
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1
            assert ann["area"] == ref["area"]
            rle = mask_utils.encode(np.asfortranarray(ref["segmentation"].astype(np.uint8)))
            assert ann["bbox"] == mask_utils.toBbox(rle).tolist()
    n_annotations = len(coco.getAnnIds())

    # Losing the assembled file costs no model work: it is rebuilt from the parts.
    (out / "instances.json").unlink()
    (inputs / "broken.jpg").unlink()
    assert _run(str(inputs), "-o", str(out), "--format", "coco", *OPTIONS) == 0
    assert len(loads) == 1
    assert len(COCO(str(out / "instances.json")).getAnnIds()) == n_annotations


def test_png_format_matches_official_amg_layout(inputs: Path, tmp_path: Path, loads: list) -> None:
    out = tmp_path / "out"
    single = inputs / IMAGES[0]
    assert _run(str(single), "-o", str(out), "--format", "png", *OPTIONS) == 0
    folder = out / single.stem
    expected = official_records(single, "binary_mask")
    rows = (folder / "metadata.csv").read_text().split("\n")
    assert rows[0] == everything_header()
    assert len(rows) == len(expected) + 1
    pngs = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    assert [p.name for p in pngs] == [f"{i}.png" for i in range(len(expected))]
    by_point = {_key(r): r for r in expected}
    for row, png in zip(rows[1:], pngs, strict=True):
        fields = row.split(",")
        assert fields[0] == png.stem
        ref = by_point[((float(fields[6]), float(fields[7])), float(fields[8]))]
        assert int(fields[1]) == ref["area"]
        assert [int(v) for v in fields[2:6]] == ref["bbox"]
        np.testing.assert_array_equal(np.array(Image.open(png)), ref["segmentation"] * 255)


def everything_header() -> str:
    """The header of the official scripts/amg.py metadata.csv, spelled out independently."""
    return (
        "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
        "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
    )


def test_glob_input_and_overlay(inputs: Path, tmp_path: Path, loads: list) -> None:
    out = tmp_path / "out"
    assert _run(str(inputs / "*1675.jpg"), "-o", str(out), "--overlay", *OPTIONS) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "000000001675.json",
        "000000001675.overlay.jpg",
    ]
    overlay = read_image(out / "000000001675.overlay.jpg")
    assert overlay.shape == read_image(inputs / IMAGES[1]).shape


def test_output_inside_input_folder_is_not_read_back(
    inputs: Path, loads: list, capsys: pytest.CaptureFixture
) -> None:
    (inputs / "broken.jpg").unlink()
    out = inputs / "masks"
    assert _run(str(inputs), "-o", str(out), "--overlay", *OPTIONS) == 0
    assert _run(str(inputs / "**" / "*.jpg"), "-o", str(out), *OPTIONS) == 0
    assert "2 image(s)" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--pred-iou-thresh", "1.5"], "pred_iou_thresh must be a number between 0 and 1"),
        (["--points-per-side", "0"], "points_per_side must be an integer >= 1"),
        (["--crop-overlap-ratio", "1"], "crop_overlap_ratio"),
    ],
)
def test_bad_options_exit_2_before_loading(
    argv: list[str], message: str, inputs: Path, tmp_path: Path, loads: list, capsys
) -> None:
    assert _run(str(inputs), "-o", str(tmp_path / "out"), *argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert loads == [] and not (tmp_path / "out").exists()


def test_no_inputs_exit_2(tmp_path: Path, loads: list, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    for target in [tmp_path / "empty", tmp_path / "missing.jpg", tmp_path / "*.png"]:
        assert _run(str(target), "-o", str(tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "no images found" in err
    assert loads == []


def test_clashing_names_and_file_output_exit_2(
    inputs: Path, tmp_path: Path, loads: list, capsys: pytest.CaptureFixture
) -> None:
    shutil.copy(inputs / IMAGES[0], inputs / (Path(IMAGES[0]).stem + ".png"))
    assert _run(str(inputs), "-o", str(tmp_path / "out")) == 2
    assert "would write the same outputs" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert _run(str(inputs / IMAGES[1]), "-o", str(tmp_path / "file")) == 2
    assert "is a file" in capsys.readouterr().err


def test_argparse_errors_exit_2(loads: list) -> None:
    with pytest.raises(SystemExit) as exited:
        _run("x.jpg", "-o", "out", "--points-per-side", "many")
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        _run("x.jpg", "-o", "out", "--format", "tiff")
    assert exited.value.code == 2

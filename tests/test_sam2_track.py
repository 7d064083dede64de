"""``segany track``: the command against Meta's ``SAM2VideoPredictor`` run by hand with the
same prompts, on the synthetic video and the small random models of test_sam2_video.py.

The command's masks must be Meta's (forward from the first prompted frame, then back to
frame 0) in both output formats, with the overlay video written; bad input is a one-line
error with exit code 2 and no output written.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from test_sam2_video import (
    FRAME_COUNT,
    FRAME_SIZE,
    SESSION_SIZE,
    meta_video_predictor,
    segany_model,
    synthetic_frames,
)

from segany.cli import main
from segany.commands import track
from segany.masks import coco_to_mask
from segany.sam2_video_predictor import Sam2VideoPredictor

NAME = "sam2.1_hiera_t"
# Two objects first prompted on frame 3 (so frames 0-2 are tracked backward): object 1 by a
# click, corrected on frame 6, object 7 by a box and a click. (Meta's predictor cannot
# track an object on frames before its first prompt on a CPU: its bf16 memories meet fp32
# weights there.)
PROMPTS = ["--point", "3:54,46", "--point", "6:80,52,0"]
PROMPTS += ["--object", "7", "--box", "3:95,15,130,55", "--point", "3:110,35"]
# Pixels within Meta's and segany's rounding of the threshold.
MAX_DIFFERENT_PIXELS = 0.001


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: see test_sam2_video.one_thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def meta():
    return meta_video_predictor(NAME, image_size=SESSION_SIZE)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    for i, frame in enumerate(synthetic_frames()):
        Image.fromarray(frame).save(folder / f"{i:05d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def expected(meta, video: Path) -> dict[int, dict[int, np.ndarray]]:
    """Meta's masks of each frame, per object id, tracked as the command tracks."""
    state = meta.init_state(str(video))
    with torch.inference_mode():
        meta.add_new_points_or_box(state, 3, 1, points=[[54, 46]], labels=[1])
        meta.add_new_points_or_box(state, 6, 1, points=[[80, 52]], labels=[0])
        meta.add_new_points_or_box(
            state, 3, 7, points=[[110, 35]], labels=[1], box=[95, 15, 130, 55]
        )
        masks: dict[int, dict[int, np.ndarray]] = {}
        for reverse in (False, True):
            for frame, obj_ids, logits in meta.propagate_in_video(state, reverse=reverse):
                masks[frame] = {
                    obj: m[0].numpy() > 0 for obj, m in zip(obj_ids, logits, strict=True)
                }
    return masks


@pytest.fixture
def segany_sam2(meta, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs segany's model with Meta's weights; hole filling off as Meta's
    runs on a CPU (its CUDA extension is missing there)."""
    model = segany_model(meta, NAME)
    monkeypatch.setattr(track, "model_from_args", lambda args: model)
    monkeypatch.setattr(
        track, "Sam2VideoPredictor", functools.partial(Sam2VideoPredictor, fill_hole_area=0)
    )


def assert_same(mask: np.ndarray, expected_mask: np.ndarray) -> None:
    assert mask.shape == FRAME_SIZE
    assert np.mean(mask != expected_mask) <= MAX_DIFFERENT_PIXELS


def run(video: Path, out: Path, *extra: str) -> int:
    return main(["track", str(video), *PROMPTS, "-o", str(out), "--precision", "fp32", *extra])


def test_png_masks_and_overlay(segany_sam2, video: Path, expected, tmp_path: Path, capsys) -> None:
    overlay = tmp_path / "overlay.mp4"
    assert run(video, tmp_path / "out", "--overlay", str(overlay)) == 0
    assert "10 frames, 2 object(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1", "7"]
    assert any(mask.any() for frame in expected.values() for mask in frame.values())
    for frame in range(FRAME_COUNT):
        for obj in (1, 7):
            written = np.asarray(Image.open(tmp_path / "out" / str(obj) / f"{frame:05d}.png"))
            assert_same(written > 0, expected[frame][obj])
    capture = cv2.VideoCapture(str(overlay))
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, picture = capture.read()
    capture.release()
    assert ok and frames == FRAME_COUNT and picture.shape[:2] == FRAME_SIZE


def test_coco_json_per_frame(segany_sam2, video: Path, expected, tmp_path: Path) -> None:
    assert run(video, tmp_path / "out", "--format", "coco") == 0
    for frame in range(FRAME_COUNT):
        record = json.loads((tmp_path / "out" / f"{frame:05d}.json").read_text())
        assert record["frame"] == frame and (record["height"], record["width"]) == FRAME_SIZE
        assert [obj["id"] for obj in record["objects"]] == [1, 7]
        for obj in record["objects"]:
            mask = coco_to_mask(obj["segmentation"])
            assert obj["area"] == mask.sum()
            assert_same(mask, expected[frame][obj["id"]])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}", "--point", "0:5,5"], "video not found"),
        (["{video}", "--point", "10:5,5"], "frame 10 is out of range: the video has frames 0 to 9"),
        (["{video}", "--point", "2:500,5"], "outside"),
        (["{video}", "--box", "2:5,5"], "--box expects FRAME:X0,Y0,X1,Y1"),
        (["{video}", "--point", "x:5,5"], "--point expects FRAME:X,Y[,LABEL]"),
        (["{video}"], "give at least one --point"),
        (["{video}", "--box", "1:1,1,9,9", "--box", "1:2,2,8,8"], "two boxes on frame 1"),
    ],
)
def test_bad_input_is_one_line(
    segany_sam2, video: Path, tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    values = {"missing": str(tmp_path / "nothing.mp4"), "video": str(video)}
    out = tmp_path / "out"
    assert main(["track", *(a.format(**values) for a in argv), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_an_image_model_is_refused(video: Path, tmp_path: Path, capsys) -> None:
    argv = ["track", str(video), "--point", "0:5,5", "-o", str(tmp_path), "--model", "default"]
    assert main(argv) == 2
    assert "needs a SAM 2 model" in capsys.readouterr().err

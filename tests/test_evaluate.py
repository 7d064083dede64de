"""Evaluation: IoU, click simulation (exact click positions with a scripted predictor),
NoC, box prompts, GrabCut, the plot and the ``segany eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany.cli import main
from segany.commands import eval as eval_command
from segany.data import Sample
from segany.errors import SeganyError
from segany.evaluate import (
    Click,
    evaluate,
    first_click,
    grabcut,
    iou,
    mask_box,
    next_click,
    plot_click_curve,
)


def rect(top: int, left: int, bottom: int, right: int, shape=(12, 16)) -> np.ndarray:
    """Mask of rows top..bottom-1, columns left..right-1."""
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


def sample_of(gt: np.ndarray, ignore: np.ndarray | None = None, name: str = "s") -> Sample:
    """A sample whose image shows the object bright on dark."""
    image = np.repeat((gt * 255).astype(np.uint8)[..., None], 3, axis=2)
    return Sample(name, Path(f"{name}.png"), image, gt[None], ignore, ["obj"])


class FakePredictor:
    """Records calls; ``respond(call)`` gives (masks, scores, logits)."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.calls: list[dict] = []
        self.image: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.image = image

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output=True,
    ):
        call = dict(
            coords=None if point_coords is None else np.asarray(point_coords).tolist(),
            labels=None if point_labels is None else np.asarray(point_labels).tolist(),
            box=None if box is None else np.asarray(box).tolist(),
            mask_input=mask_input,
            multimask=multimask_output,
        )
        self.calls.append(call)
        masks, scores = self.respond(self, call)
        masks = np.asarray(masks, bool)
        # Logits that tell which call and candidate they came from: 10 * call + index.
        logits = np.stack([np.full((8, 8), 10 * len(self.calls) + i) for i in range(len(masks))])
        return masks, np.asarray(scores, np.float32), logits.astype(np.float32)


def bright_pixels(predictor: FakePredictor, call: dict):
    """A perfect segmenter for :func:`sample_of` images."""
    mask = predictor.image[..., 0] > 127
    return ([mask] * 3, [0.2, 0.9, 0.1]) if call["multimask"] else ([mask], [0.9])


def nothing(predictor: FakePredictor, call: dict):
    empty = np.zeros(predictor.image.shape[:2], bool)
    return ([empty] * 3, [0.2, 0.9, 0.1]) if call["multimask"] else ([empty], [0.9])


# --------------------------------------------------------------------------- IoU, boxes, clicks


def test_iou_hand_computed() -> None:
    gt = rect(0, 0, 2, 3)  # 6 px
    pred = rect(0, 1, 2, 3) | rect(3, 0, 4, 1)  # 4 px inside, 1 outside
    assert iou(pred, gt) == pytest.approx(4 / 7)
    assert iou(pred, gt, ignore=rect(3, 0, 4, 1)) == pytest.approx(4 / 6)
    assert iou(pred, gt, ignore=rect(0, 0, 4, 1)) == pytest.approx(1.0)
    assert iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert iou(np.zeros((3, 3), bool), np.ones((3, 3), bool)) == 0.0


def test_mask_box_is_inclusive() -> None:
    np.testing.assert_array_equal(mask_box(rect(2, 3, 5, 6)), [3, 2, 5, 4])
    np.testing.assert_array_equal(mask_box(rect(7, 9, 8, 10)), [9, 7, 9, 7])


def test_first_click_counts_the_image_border_as_boundary() -> None:
    assert first_click(rect(1, 2, 6, 7, (10, 10))) == Click(4, 3, 1)  # 5 x 5: its centre
    # 5 x 3: (3, 2), (4, 2), (5, 2) are all 2 from the boundary; the first in row-major wins.
    assert first_click(rect(1, 2, 4, 7, (10, 10))) == Click(3, 2, 1)
    # Touching the left border: without the border as boundary column 0 would win.
    # Largest distance is 2; the first such pixel in row-major order is (1, 1).
    assert first_click(rect(0, 0, 10, 4, (10, 10))) == Click(1, 1, 1)
    with pytest.raises(ValueError):
        first_click(np.zeros((4, 4), bool))


def test_next_click_largest_error_region() -> None:
    gt = rect(2, 2, 8, 12)
    # Missed right part (5 x 6) vs an extra 2 x 2 blob: foreground click in the miss.
    pred = rect(2, 2, 8, 7) | rect(9, 0, 11, 2)
    assert next_click(gt, pred) == Click(9, 4, 1)
    # Extra 3 x 3 blob, nothing missed: background click at its centre.
    assert next_click(gt, gt | rect(2, 12, 5, 15)) == Click(13, 3, 0)
    assert next_click(gt, gt) is None
    # Errors inside ignore pixels are not errors.
    assert next_click(gt, gt | rect(2, 12, 5, 15), ignore=rect(0, 12, 12, 16)) is None


# --------------------------------------------------------------------------- evaluate


GT = rect(2, 2, 8, 12)  # 10 x 6 = 60 px
LEFT = rect(2, 2, 8, 7)  # the left half: IoU 0.5
OVERSHOOT = GT | rect(2, 12, 5, 15)  # 9 extra pixels: IoU 60 / 69


def scripted(predictor: FakePredictor, call: dict):
    """Click 1: three candidates; click 2: overshoot; click 3: exact; box: exact."""
    if call["box"] is not None:
        return [GT], [0.5]
    answers = {
        1: ([LEFT, np.zeros_like(GT), GT], [0.9, 0.1, 0.5]),
        2: ([OVERSHOOT], [0.8]),
        3: ([GT], [0.95]),
    }
    return answers[len(call["coords"])]


def test_click_sequence_is_exact() -> None:
    predictor = FakePredictor(scripted)
    result = evaluate(predictor, [sample_of(GT)], prompt=["clicks", "box"], progress=False)
    (record,) = result.records
    # Centre (4, 4); centre of the missed right part (9, 4); centre of the extra blob (13, 3).
    assert record.clicks == [(4, 4, 1), (9, 4, 1), (13, 3, 0)]
    assert record.click_ious[:3] == pytest.approx([0.5, 60 / 69, 1.0])
    assert record.click_ious[3:] == [1.0] * 6  # nothing left to correct
    assert record.oracle_click_ious == [1.0] * 9  # the oracle keeps the exact candidate
    assert (record.iou_point, record.iou_point_oracle, record.iou_box) == (0.5, 1.0, 1.0)
    assert (record.noc(0.85, 20), record.noc(0.90, 20)) == (2, 3)

    top, second, third, oracle, box = predictor.calls
    assert (top["coords"], top["labels"], top["multimask"]) == ([[4, 4]], [1], True)
    assert top["mask_input"] is None
    assert (second["coords"], second["labels"], second["multimask"]) == (
        [[4, 4], [9, 4]],
        [1, 1],
        False,
    )
    assert (third["coords"], third["labels"], third["multimask"]) == (
        [[4, 4], [9, 4], [13, 3]],
        [1, 1, 0],
        False,
    )
    # The kept mask's logits go back in: call 1's top-scoring candidate 0, then call 2's.
    assert second["mask_input"].shape == (1, 8, 8) and np.all(second["mask_input"] == 10)
    assert np.all(third["mask_input"] == 20)
    assert oracle["coords"] == [[4, 4]] and oracle["multimask"]
    assert box["box"] == [2, 2, 11, 7] and not box["multimask"] and box["coords"] is None

    summary = result.summary()
    assert summary["miou_clicks"] == pytest.approx(
        {"1": 0.5, "2": 60 / 69, "3": 1.0, "5": 1.0, "9": 1.0}
    )
    assert summary["miou_clicks_oracle"] == {k: 1.0 for k in ("1", "2", "3", "5", "9")}
    assert (summary["noc85"], summary["noc90"], summary["n_objects"]) == (2, 3, 1)
    assert summary["miou_box"] == 1.0 and summary["grabcut_miou_box"] is None


def test_perfect_predictions() -> None:
    samples = [sample_of(GT, name="a"), sample_of(rect(5, 1, 30, 9, (40, 30)), name="b")]
    result = evaluate(
        FakePredictor(bright_pixels), samples, ["point", "box", "clicks"], progress=False
    )
    summary = result.summary()
    assert summary["n_objects"] == 2 and summary["n_images"] == 2
    assert summary["miou_point"] == summary["miou_box"] == 1.0
    assert set(summary["miou_clicks"].values()) == {1.0}
    assert summary["noc85"] == summary["noc90"] == 1


def test_empty_predictions() -> None:
    predictor = FakePredictor(nothing)
    result = evaluate(predictor, [sample_of(GT)], "clicks", max_clicks=20, progress=False)
    (record,) = result.records
    assert record.click_ious == [0.0] * 20
    assert record.clicks == [(4, 4, 1)] * 20  # the whole object is still missed
    summary = result.summary()
    assert set(summary["miou_clicks"].values()) == {0.0}
    assert summary["noc85"] == summary["noc90"] == 20
    assert summary["miou_box"] is None  # not evaluated


def test_ignore_pixels_are_not_errors() -> None:
    ignore = rect(0, 12, 12, 16)
    predicted = GT | rect(2, 12, 5, 15)  # the extra part lies in ignore pixels

    def respond(predictor, call):
        return [predicted] * 3, [0.9, 0.5, 0.1]

    predictor = FakePredictor(respond)
    result = evaluate(predictor, [sample_of(GT, ignore)], "clicks", progress=False)
    (record,) = result.records
    assert record.click_ious == [1.0] * 9 and record.noc(0.9, 20) == 1
    assert len(predictor.calls) == 1  # no error left: no more clicks


def test_point_only_and_short_click_budget() -> None:
    result = evaluate(FakePredictor(scripted), [sample_of(GT)], "point", progress=False)
    summary = result.summary()
    assert (summary["miou_point"], summary["miou_point_oracle"]) == (0.5, 1.0)
    assert summary["miou_clicks"] is None and summary["noc85"] is None

    result = evaluate(
        FakePredictor(scripted), [sample_of(GT)], "clicks", max_clicks=2, progress=False
    )
    summary = result.summary()
    assert summary["miou_clicks"] == pytest.approx(
        {"1": 0.5, "2": 60 / 69, "3": None, "5": None, "9": None}
    )
    assert (summary["noc85"], summary["noc90"]) == (2, 2)  # 0.90 never reached within 2


def test_bad_arguments() -> None:
    with pytest.raises(SeganyError, match="unknown prompt"):
        evaluate(FakePredictor(nothing), [], "scribble", progress=False)
    with pytest.raises(SeganyError, match="max_clicks"):
        evaluate(FakePredictor(nothing), [], "clicks", max_clicks=0, progress=False)
    with pytest.raises(SeganyError, match="unknown baseline"):
        evaluate(FakePredictor(nothing), [], "clicks", baseline="watershed", progress=False)


# --------------------------------------------------------------------------- GrabCut


def disc_image() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:80, :90]
    disc = (yy - 40) ** 2 + (xx - 45) ** 2 <= 18**2
    image = rng.integers(20, 60, (80, 90, 3)).astype(np.uint8)
    image[disc] = rng.integers(190, 240, (int(disc.sum()), 3)).astype(np.uint8)
    return image, disc


def test_grabcut_separates_a_bright_disc() -> None:
    image, disc = disc_image()
    assert iou(grabcut(image, mask_box(disc)), disc) > 0.9
    result = evaluate(
        None,
        [Sample("d", Path("d.png"), image, disc[None], None, ["disc"])],
        baseline="grabcut",
        progress=False,
    )
    assert result.summary()["grabcut_miou_box"] > 0.9
    assert result.summary()["miou_box"] is None


def test_grabcut_degenerate_boxes() -> None:
    image, _ = disc_image()
    np.testing.assert_array_equal(grabcut(image, [5, 6, 5, 6]), rect(6, 5, 7, 6, (80, 90)))
    assert grabcut(image, [0, 0, 89, 79]).all()  # no background to model: the box
    line = grabcut(image, [10, 20, 60, 20])
    assert line.shape == (80, 90) and not line[:19].any() and not line[21:].any()
    assert grabcut(image, [80, 70, 200, 200]).shape == (80, 90)  # clipped to the image


# --------------------------------------------------------------------------- plot and CLI


def test_plot_click_curve(tmp_path) -> None:
    result = evaluate(FakePredictor(scripted), [sample_of(GT)], "clicks", progress=False)
    path = plot_click_curve(result, tmp_path / "plots" / "curve.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (600, 400)
        colours = {c for _, c in picture.convert("RGB").getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (
        255,
        127,
        14,
    ) in colours  # both curves, matplotlib's C0 and C1
    box_only = evaluate(FakePredictor(scripted), [sample_of(GT)], "box", progress=False)
    with pytest.raises(SeganyError, match="nothing to plot"):
        plot_click_curve(box_only, tmp_path / "none.png")


def run_cli(argv: list[str]) -> int:
    return main(argv)


@pytest.fixture
def one_thread():
    # The decoder is tiny: on a busy 2-core machine extra threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    gt = rect(10, 12, 30, 40, (48, 64))
    image = np.full((48, 64, 3), 30, np.uint8)
    image[gt] = 220
    Image.fromarray(image).save(root / "images" / "one.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(root / "masks" / "one__thing.png")
    return root


def test_cli_json(tiny_data, tmp_path, capsys, one_thread) -> None:
    plot = tmp_path / "curve.png"
    argv = [
        "eval",
        "--data",
        str(tiny_data),
        "--prompt",
        "clicks",
        "--prompt",
        "box",
        "--max-clicks",
        "2",
        "--baseline",
        "grabcut",
        "--json",
        "--device",
        "cpu",
        "--plot",
        str(plot),
    ]
    assert run_cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_objects"] == 1 and summary["n_images"] == 1
    assert summary["split"] == "all" and summary["format"] == "masks"
    assert set(summary["miou_clicks"]) == {"1", "2", "3", "5", "9"}
    assert summary["miou_clicks"]["3"] is None  # beyond --max-clicks 2
    for key in ("miou_box", "miou_point", "grabcut_miou_box"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["grabcut_miou_box"] > 0.9
    assert 1 <= summary["noc85"] <= 2 and 1 <= summary["noc90"] <= 2
    assert plot.is_file()


def test_cli_errors(tiny_data, tmp_path, capsys) -> None:
    assert run_cli(["eval", "--data", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent" in err
    assert run_cli(["eval", "--data", str(tiny_data), "--prompt", "box", "--plot", "a.png"]) == 2
    assert "--prompt clicks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["eval", "--data", str(tiny_data), "--format", "voc"])
    assert exit_info.value.code == 2


def test_table_format() -> None:
    summary = {
        "dataset": "tiny",
        "format": "masks",
        "split": "val",
        "n_images": 2,
        "n_objects": 3,
        "skipped_images": 0,
        "miou_point": 0.5,
        "miou_point_oracle": 0.75,
        "miou_box": 0.8125,
        "grabcut_miou_box": None,
        "max_clicks": 20,
        "noc85": 3.5,
        "noc90": 7.25,
        "miou_clicks": {"1": 0.5, "2": 0.6, "3": 0.7, "5": 0.8, "9": 0.9},
        "miou_clicks_oracle": {"1": 0.75, "2": 0.6, "3": 0.7, "5": 0.8, "9": None},
    }
    table = eval_command.format_table(summary)
    assert "tiny (masks, split val): 2 images, 3 objects" in table
    assert "box mIoU       0.812" in table and "GrabCut" not in table
    assert "  0.500  0.600  0.700  0.800  0.900" in table
    assert "  0.750  0.600  0.700  0.800      -" in table
    assert "NoC@85 3.50   NoC@90 7.25" in table

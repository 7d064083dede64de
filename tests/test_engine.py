"""``segany engine``: the data engine on a local Ray cluster and in-process, on real photos.

A tiny random-weight model (fixed seed) stands in for a trained one, with the generator's
filters off so that every image gets several masks. Outputs are checked against
independent computations: pycocotools decoding, the generator run directly in this
process, overlaps computed with NumPy, the model's weights before and after fine-tuning.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from test_train import TINY_HYBRID as TINY

from segany.amg_options import AmgOptions
from segany.automatic_mask_generator import SamAutomaticMaskGenerator
from segany.build import build_sam_from_config, config_from_dict
from segany.checkpoint import read_state_dict
from segany.cli import main
from segany.engine.annotate import ModelSpec, Result
from segany.engine.auto import RunSettings, Summary, plan_auto, run_auto
from segany.engine.propose import PROPOSAL_CATEGORY, is_proposal, select_proposals
from segany.engine.retrain import RetrainOptions, _train_config, held_out
from segany.engine.sources import require_inputs
from segany.errors import SeganyError
from segany.images import read_image
from segany.loading import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [
    "000000000009",
    "000000000025",
    "000000000030",
    "000000000034",
    "000000000036",
    "000000000042",
]
# Filters off: the 64 points' masks all reach duplicate removal. About a second per photo
# on one CPU, so the worker killed at the first result is still holding images.
GENERATOR = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
# Also no duplicate removal: 2 x 2 points x 3 outputs = 12 masks per photo, in little time.
MANY_MASKS = {**GENERATOR, "points_per_side": 2, "box_nms_thresh": 1.0}


def _flags(options: dict) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    return [*flags, "--device", "cpu", "--precision", "fp32"]


FLAGS = _flags(GENERATOR)
MANY_FLAGS = _flags(MANY_MASKS)


# -------------------------------------------------------------------------------------
# Fixtures
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs on one thread, as each Ray worker here: several threads per process
    are slow on a machine that is busy with other work (CI runners, shared boxes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model saved with its config (so every worker can load it)."""
    torch.manual_seed(0)
    config = config_from_dict(TINY)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_model(build_sam_from_config(config), path, config)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Six COCO photos (copies, so that outputs are written beside nothing shared)."""
    folder = tmp_path_factory.mktemp("photos")
    for stem in PHOTOS:
        source = shared_data / "coco128-seg" / "images" / "train2017" / f"{stem}.jpg"
        (folder / f"{stem}.jpg").write_bytes(source.read_bytes())
    return folder


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster with two CPUs, started once for the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _spec(checkpoint: Path) -> ModelSpec:
    return ModelSpec(None, str(checkpoint), "cpu", AmgOptions(**GENERATOR), precision="fp32")


@dataclass
class KilledRun:
    outdir: Path
    summary: Summary
    results: list[Result]
    killed: int


@pytest.fixture(scope="module")
def ray_run(ray_local, photos: Path, checkpoint: Path, tmp_path_factory) -> KilledRun:
    """The six photos on two Ray workers; the worker that delivers the first result is
    killed (SIGKILL) right then, while the other images are still in flight."""
    outdir = tmp_path_factory.mktemp("ray") / "out"
    jobs = plan_auto(require_inputs(str(photos), outdir), outdir)
    results: list[Result] = []
    killed: list[int] = []

    def kill_first_worker(result: Result) -> None:
        results.append(result)
        if not killed:
            os.kill(result.worker, signal.SIGKILL)
            killed.append(result.worker)

    summary = run_auto(
        jobs, outdir, _spec(checkpoint), RunSettings(workers=2), ray_local, False, kill_first_worker
    )
    return KilledRun(outdir, summary, results, killed[0])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie is dead too


def _document(path: Path) -> dict:
    return json.loads(path.read_text())


def _decoded(annotation: dict) -> np.ndarray:
    rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("segany engine: error: ") and "Traceback" not in err[0]
    return err[0]


# -------------------------------------------------------------------------------------
# (a) Ray: a killed worker, every image done once
# -------------------------------------------------------------------------------------


def test_ray_run_survives_a_killed_worker(ray_run: KilledRun, photos: Path) -> None:
    assert not _alive(ray_run.killed)
    summary = ray_run.summary
    assert (summary.runner, summary.workers) == ("ray", 2)
    assert (summary.done_this_run, summary.done_total, summary.failed) == (6, 6, 0)
    delivered = sorted(r.path for r in ray_run.results)
    assert delivered == sorted(str((photos / f"{s}.jpg").resolve()) for s in PHOTOS)
    # Images the killed worker held were run again by its restarted process: a third pid.
    assert len({r.worker for r in ray_run.results}) >= 3
    names = sorted(p.name for p in ray_run.outdir.iterdir())
    assert names == sorted([f"{s}.json" for s in PHOTOS] + ["summary.json"])  # no temp files
    assert json.loads((ray_run.outdir / "summary.json").read_text())["done_this_run"] == 6
    for stem in PHOTOS:
        document = _document(ray_run.outdir / f"{stem}.json")
        width, height = Image.open(photos / f"{stem}.jpg").size
        assert document["image"] == {
            "image_id": int(stem),
            "file_name": f"{stem}.jpg",
            "width": width,
            "height": height,
        }
        assert len(document["annotations"]) >= 1
        for ann in document["annotations"]:
            mask = _decoded(ann)
            assert mask.shape == (height, width) and int(mask.sum()) == ann["area"]


# -------------------------------------------------------------------------------------
# (b) In-process and Ray give the same masks; cluster mode ships bytes
# -------------------------------------------------------------------------------------


def test_in_process_gives_the_ray_masks(
    ray_run: KilledRun, photos: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "local"
    argv = ["engine", "auto", str(photos), "-o", str(out), "--in-process"]
    assert main([*argv, "--checkpoint", str(checkpoint), *FLAGS]) == 0
    for stem in PHOTOS:
        local, remote = _document(out / f"{stem}.json"), _document(ray_run.outdir / f"{stem}.json")
        assert local["image"] == remote["image"]
        assert len(local["annotations"]) == len(remote["annotations"])
        for mine, theirs in zip(local["annotations"], remote["annotations"], strict=True):
            scores = ("predicted_iou", "stability_score")  # sums may round differently
            assert {k: v for k, v in mine.items() if k not in scores} == {
                k: v for k, v in theirs.items() if k not in scores
            }
            for key in scores:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5)
    # Independently: the generator run here, on the same pixels, with the same weights.
    generator = SamAutomaticMaskGenerator(
        load_model(None, str(checkpoint), "cpu"), precision="fp32", **GENERATOR
    )
    for stem in PHOTOS[:2]:
        records = generator.generate(read_image(photos / f"{stem}.jpg"))
        annotations = _document(ray_run.outdir / f"{stem}.json")["annotations"]
        assert len(annotations) == len(records)
        for ann, record in zip(annotations, records, strict=True):
            np.testing.assert_array_equal(_decoded(ann), record["segmentation"])
            assert ann["predicted_iou"] == pytest.approx(record["predicted_iou"], abs=1e-6)


def test_cluster_mode_ships_bytes_and_reports_unreadable_files(
    ray_local, ray_run: KilledRun, photos: Path, checkpoint: Path, tmp_path: Path
) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two photos, a broken file, a missing one\n{photos}/{PHOTOS[0]}.jpg\n")
    listing.write_text(listing.read_text() + f"{photos}/{PHOTOS[1]}.jpg\nbroken.jpg\ngone.jpg\n")
    out = tmp_path / "out"
    jobs = plan_auto(require_inputs(str(listing), out), out)
    settings = RunSettings(workers=2, read_on_workers=False)
    summary = run_auto(jobs, out, _spec(checkpoint), settings, ray_local)
    assert (summary.done_this_run, summary.failed) == (2, 2)
    for stem in PHOTOS[:2]:
        assert _document(out / f"{stem}.json") == _document(ray_run.outdir / f"{stem}.json")
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {Path(f["path"]).name: f["reason"] for f in failures}
    assert set(reasons) == {"broken.jpg", "gone.jpg"}
    assert "broken.jpg" in reasons["broken.jpg"] and "cannot read image" in reasons["broken.jpg"]
    assert "No such file" in reasons["gone.jpg"]


# -------------------------------------------------------------------------------------
# (c) Resume after the driver is killed
# -------------------------------------------------------------------------------------


def test_killed_run_resumes_with_only_unfinished_images(
    photos: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["engine", "auto", str(photos), "-o", str(out), "--in-process"]
    argv += ["--checkpoint", str(checkpoint), *FLAGS]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        [sys.executable, "-m", "segany.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    try:
        while not list(out.glob("0*.json")):  # kill the run as its first image is written
            assert run.poll() is None, "the run ended before writing an image"
            assert time.monotonic() < deadline, "no image written in time"
            time.sleep(0.01)
    finally:
        run.kill()
        run.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.json")}
    assert 1 <= len(finished) < len(PHOTOS)
    for name in finished:
        _document(out / name)  # complete JSON, never a truncated one

    assert main(argv) == 0
    summary = _document(out / "summary.json")
    assert summary["done_this_run"] == len(PHOTOS) - len(finished)
    assert summary["skipped_already_done"] == len(finished)
    assert summary["done_total"] == len(PHOTOS)
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert f"{len(finished)} already done" in capsys.readouterr().out

    # Lost outputs are redone, nothing else.
    (out / f"{PHOTOS[0]}.json").unlink()
    (out / f"{PHOTOS[1]}.json").unlink()
    assert main(argv) == 0
    assert _document(out / "summary.json")["done_this_run"] == 2


# -------------------------------------------------------------------------------------
# (d) Unreadable images
# -------------------------------------------------------------------------------------


def test_unreadable_images_are_recorded_and_skipped(
    photos: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = (photos / f"{PHOTOS[0]}.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(good)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    argv = ["engine", "auto", str(folder), "-o", str(out), "--in-process"]
    argv += ["--checkpoint", str(checkpoint), *MANY_FLAGS]

    assert main(argv) == 1
    captured = capsys.readouterr()
    assert sorted(line.split(":")[1] for line in captured.err.strip().splitlines()) == [
        f" skipping {(folder / name).resolve()}" for name in ("broken.jpg", "truncated.jpg")
    ]
    assert "1 annotated this run" in captured.out and "2 failed" in captured.out
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["path"]).name for f in failures) == ["broken.jpg", "truncated.jpg"]
    assert all(f["reason"].startswith("cannot read image") for f in failures)
    assert sorted(p.name for p in out.glob("*.json")) == ["a.json", "summary.json"]

    # Fixed files are annotated by the next run; the others stay listed.
    (folder / "truncated.jpg").write_bytes(good)
    assert main(argv) == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [Path(f["path"]).name for f in failures] == ["broken.jpg"]
    summary = _document(out / "summary.json")
    assert (summary["done_this_run"], summary["skipped_already_done"], summary["failed"]) == (
        1,
        1,
        1,
    )
    (folder / "broken.jpg").unlink()
    assert main(argv) == 0
    assert not (out / "failures.jsonl").exists()


# -------------------------------------------------------------------------------------
# (e) Bad input: exit 2, one line
# -------------------------------------------------------------------------------------


def test_cli_errors_exit_2_with_one_line(
    photos: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "comments.txt").write_text("# nothing listed\n\n")
    (tmp_path / "gone.txt").write_text("a.jpg\nb.jpg\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "not_coco.json").write_text('{"images": 3}')
    (tmp_path / "not_json.json").write_text("{")
    model = ["--checkpoint", str(checkpoint)]
    auto = ["engine", "auto", str(photos), "-o", str(out), *model]
    cases = [
        (["engine", "auto", str(tmp_path / "missing"), "-o", str(out)], "does not exist"),
        (["engine", "auto", str(tmp_path / "empty"), "-o", str(out)], "has no image files"),
        (["engine", "auto", str(tmp_path / "*.png"), "-o", str(out)], "nothing matches"),
        (["engine", "auto", str(tmp_path / "binary.txt"), "-o", str(out)], "not UTF-8"),
        (["engine", "auto", str(tmp_path / "comments.txt"), "-o", str(out)], "lists no images"),
        (["engine", "auto", str(tmp_path / "gone.txt"), "-o", str(out)], "none of the 2 files"),
        ([*auto, "--workers", "0"], "--workers must be at least 1"),
        ([*auto, "--points-per-side", "0"], "points_per_side must be an integer >= 1"),
        ([*auto, "--in-process", "--ray-address", "127.0.0.1:6379"], "--in-process"),
        ([*auto, "--shared-storage"], "give it with --ray-address"),
        ([*auto, "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
        ([*auto, "--ray-address", "headnode"], "is not HOST:PORT"),
        ([*auto, "--model", "vit_q"], "unknown model 'vit_q'"),
        (["engine", "auto", str(photos), "-o", str(out), "--checkpoint", "no.pt"], "not found"),
        (["engine", "auto", str(photos), "-o", str(tmp_path / "file")], "is a file"),
        (
            ["engine", "propose", str(tmp_path / "nope.json"), "-o", str(out / "p.json")],
            "not found",
        ),
        (
            ["engine", "propose", str(tmp_path / "not_coco.json"), "-o", str(out / "p.json")],
            "is not a COCO instances file",
        ),
        (
            ["engine", "propose", str(tmp_path / "not_json.json"), "-o", str(out / "p.json")],
            "cannot read COCO annotations",
        ),
        (
            ["engine", "retrain", str(tmp_path / "not_coco.json"), "-o", str(out), *model],
            "is not a COCO instances file",
        ),
        (
            ["engine", "retrain", str(tmp_path / "x.json"), "-o", str(out), "--val-fraction", "1"],
            "--val-fraction must be between 0 and 1",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _one_error_line(capsys), argv
    assert not out.exists(), "a failed command leaves no output"


def test_without_ray(
    monkeypatch: pytest.MonkeyPatch,
    photos: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    listing = tmp_path / "one.txt"
    listing.write_text(str(photos / f"{PHOTOS[0]}.jpg"))
    argv = ["engine", "auto", str(listing), "-o", str(tmp_path / "out")]
    argv += ["--checkpoint", str(checkpoint), *MANY_FLAGS]
    assert main([*argv, "--ray-address", "127.0.0.1:6379"]) == 2
    assert "needs Ray, which is not installed" in _one_error_line(capsys)
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "note: Ray is not installed, annotating in this process" in err[0]
    assert _document(tmp_path / "out" / "summary.json")["runner"] == "in-process"


# -------------------------------------------------------------------------------------
# (f) Proposals
# -------------------------------------------------------------------------------------


def _rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def test_overlap_rule_on_hand_made_masks() -> None:
    """A 10 x 10 square proposal against annotations sharing 0, 20 and 30 of its pixels."""
    square = np.zeros((20, 20), bool)
    square[0:10, 0:10] = True
    candidates = [{"segmentation": _rle(square)}, {"segmentation": _rle(np.zeros((20, 20)))}]
    for columns, kept in [((12, 20), True), ((0, 2), True), ((0, 3), False)]:
        occupied = np.zeros((20, 20), bool)
        occupied[:, columns[0] : columns[1]] = True  # shares 0, 20 or 30 pixels
        chosen = select_proposals(candidates, _rle(occupied), max_overlap=0.2)
        shared = (columns[1] - columns[0]) * 10 / 100 if columns[0] == 0 else 0.0
        expected = [(candidates[0], pytest.approx(shared))] if kept else []
        assert chosen == expected  # the empty candidate is never proposed


def test_which_annotations_are_unaccepted_proposals() -> None:
    proposal_categories = {5}
    cases = [
        ({"segany": {"proposal": True}, "category_id": 1}, True),
        ({"segany": {"proposal": False}, "category_id": 5}, False),  # accepted: the mark decides
        ({"source": "proposal", "category_id": 1}, True),  # as segany serve exports them
        ({"source": "manual", "category_id": 5}, False),
        ({"category_id": 5}, True),  # the mark lost by a tool, the category kept
        ({"category_id": 1}, False),
    ]
    for annotation, expected in cases:
        assert is_proposal(annotation, proposal_categories) is expected, annotation


def test_propose_adds_only_masks_off_the_annotations(
    photos: Path, checkpoint: Path, tmp_path: Path
) -> None:
    stems = PHOTOS[:2]
    work = tmp_path / "work"
    run = ["--in-process", "--checkpoint", str(checkpoint), *MANY_FLAGS]
    listing = tmp_path / "two.txt"
    listing.write_text("".join(f"{photos}/{s}.jpg\n" for s in stems))
    assert main(["engine", "auto", str(listing), "-o", str(work), *run]) == 0
    automatic = {s: _document(work / f"{s}.json") for s in stems}
    first = automatic[stems[0]]
    sizes = {i: automatic[s]["image"] for i, s in [(7, stems[0]), (8, stems[1])]}
    height, width = sizes[7]["height"], sizes[7]["width"]

    # Image 1: one automatic mask re-annotated by hand (RLE) plus a box (polygon): masks
    # like that one are dropped. Image 2: a small crowd region, which the (large) masks of
    # the random model mostly leave alone.
    crowd = np.zeros((sizes[8]["height"], sizes[8]["width"]), bool)
    crowd[:100, :120] = True
    given = {
        "info": {"description": "constructed"},
        "images": [
            {"id": i, "file_name": f"{stem}.jpg", "width": sizes[i]["width"],
             "height": sizes[i]["height"]}
            for i, stem in [(7, stems[0]), (8, stems[1])]
        ],
        "annotations": [
            {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [0] * 4,
             "segmentation": first["annotations"][0]["segmentation"]},
            {"id": 9, "image_id": 7, "category_id": 2, "iscrowd": 0, "area": 1, "bbox": [0] * 4,
             "segmentation": [[20, 10, 90, 10, 90, 60, 20, 60]]},
            {"id": 4, "image_id": 8, "category_id": 1, "iscrowd": 1, "area": 1, "bbox": [0] * 4,
             "segmentation": _rle(crowd)},
        ],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "box"}],
    }  # fmt: skip
    coco = tmp_path / "annotations.json"
    coco.write_text(json.dumps(given))
    out = tmp_path / "proposed.json"
    argv = ["engine", "propose", str(coco), "-o", str(out), "--images", str(photos)]
    assert main([*argv, "--work", str(work), *run]) == 0
    result = json.loads(out.read_text())

    assert result["info"] == given["info"] and result["images"] == given["images"]
    assert result["annotations"][:3] == given["annotations"]  # originals unchanged
    assert result["categories"][:2] == given["categories"]
    assert result["categories"][2] == {
        "id": 3,
        "name": PROPOSAL_CATEGORY,
        "supercategory": "segany",
    }
    proposals = result["annotations"][3:]
    assert [p["id"] for p in proposals] == list(range(10, 10 + len(proposals)))

    # Expected, independently: overlap with the hand-made annotation masks, in NumPy.
    polygon = mask_utils.decode(
        mask_utils.frPyObjects([[20, 10, 90, 10, 90, 60, 20, 60]], height, width)
    )
    occupied = {
        7: _decoded(first["annotations"][0]) | polygon[..., 0].astype(bool),
        8: crowd,
    }
    expected, dropped = [], 0
    for image_id, stem in [(7, stems[0]), (8, stems[1])]:
        for ann in automatic[stem]["annotations"]:
            mask = _decoded(ann)
            if mask.sum() and (mask & occupied[image_id]).sum() / mask.sum() <= 0.2:
                expected.append((image_id, ann["segmentation"]["counts"], ann["predicted_iou"]))
            else:
                dropped += 1
    assert dropped >= 1 and len(expected) >= 1  # the case tests both outcomes
    found = [(p["image_id"], p["segmentation"]["counts"], p["score"]) for p in proposals]
    assert found == expected
    for proposal in proposals:
        assert proposal["category_id"] == 3 and proposal["iscrowd"] == 0
        assert proposal["segany"]["proposal"] is True
        assert proposal["segany"]["predicted_iou"] == proposal["score"]
        assert proposal["area"] == int(_decoded(proposal).sum())
        rle = {**proposal["segmentation"], "counts": proposal["segmentation"]["counts"].encode()}
        assert proposal["bbox"] == mask_utils.toBbox(rle).tolist()


# -------------------------------------------------------------------------------------
# (g) Retraining
# -------------------------------------------------------------------------------------


def test_retrain_builds_its_training_config(tmp_path: Path, monkeypatch) -> None:
    """The TrainConfig is built directly: paths stay as given (a relative -o is not taken
    against itself), and the trainer's checks still run."""
    monkeypatch.chdir(tmp_path)
    train_dir = Path("out") / "data" / "train"
    train_dir.mkdir(parents=True)
    config = config_from_dict(TINY)
    options = RetrainOptions(steps=7, device="cpu")
    built = _train_config(Path("out"), train_dir, config, Path("out/base.safetensors"), options)
    assert built.output == Path("out") and built.data.train[0].root == train_dir
    assert built.model.checkpoint == Path("out/base.safetensors") and built.model.name is None
    assert config_from_dict(built.model.config) == config
    assert (built.optim.steps, built.optim.warmup_steps, built.optim.precision) == (7, 1, "fp32")
    assert built.log_every == 7 and built.model.freeze == "encoder"
    with pytest.raises(SeganyError, match="data folder not found"):
        _train_config(Path("out"), Path("missing"), config, Path("base"), options)


def test_retrain_fine_tunes_and_reports(
    shared_data: Path, checkpoint: Path, tmp_path: Path
) -> None:
    source = json.loads((shared_data / "dsb2018" / "annotations.json").read_text())
    chosen = {240, 458, 501, 168}  # small images with 3-4 nuclei each
    annotations = [a for a in source["annotations"] if a["image_id"] in chosen]
    proposal = {**annotations[0], "id": 10**6, "segany": {"proposal": True}}
    accepted = {**annotations[1], "id": 10**6 + 1, "segany": {"proposal": False}}
    coco = tmp_path / "accepted.json"
    coco.write_text(
        json.dumps(
            {
                "images": [i for i in source["images"] if i["id"] in chosen],
                "annotations": [*annotations, proposal, accepted],
                "categories": source["categories"],
            }
        )
    )
    out = tmp_path / "round1"
    argv = ["engine", "retrain", str(coco), "-o", str(out)]
    argv += ["--images", str(shared_data / "dsb2018" / "images"), "--checkpoint", str(checkpoint)]
    argv += ["--steps", "2", "--batch-images", "1", "--masks-per-image", "2", "--eval-clicks", "2"]
    assert main([*argv, "--val-fraction", "0.25", "--device", "cpu"]) == 0

    report = json.loads((out / "report.json").read_text())
    stems = {Path(i["file_name"]).stem: i["id"] for i in source["images"] if i["id"] in chosen}
    val_stems = held_out(sorted(stems), 0.25, 0)
    assert len(val_stems) == 1
    train_ids = {stems[s] for s in stems if s not in val_stems}
    train_doc = json.loads((out / "data" / "train" / "annotations.json").read_text())
    assert {i["id"] for i in train_doc["images"]} == train_ids
    expected_objects = [a["id"] for a in annotations if a["image_id"] in train_ids]
    if accepted["image_id"] in train_ids:
        expected_objects.append(accepted["id"])
    assert sorted(a["id"] for a in train_doc["annotations"]) == sorted(expected_objects)
    assert report["train"]["proposals_left_out"] == 1
    assert report["validation"]["images"] == 1
    for key, change in report["change"].items():
        before, after = report["before"][key], report["after"][key]
        assert before is not None and after is not None
        assert change == pytest.approx(after - before)
    assert set(report["before"]) == {
        "box mIoU", "mIoU 1 click", "mIoU 2 clicks", "NoC@85 (max 2)", "NoC@90 (max 2)"
    }  # fmt: skip

    # The model: the base's encoder weights (frozen), a changed decoder. (BatchNorm running
    # statistics are buffers, which the trainer's train mode still updates.)
    base, tuned = read_state_dict(checkpoint), read_state_dict(out / "model.safetensors")
    assert Path(report["model"]) == out / "model.safetensors"
    model = build_sam_from_config(config_from_dict(TINY))
    encoder = [f"image_encoder.{k}" for k, _ in model.image_encoder.named_parameters()]
    decoder = [k for k in base if k.startswith("mask_decoder.")]
    assert all(torch.equal(base[k], tuned[k]) for k in encoder)
    assert any(not torch.equal(base[k], tuned[k]) for k in decoder)
    assert load_model(None, str(out / "model.safetensors"), "cpu") is not None

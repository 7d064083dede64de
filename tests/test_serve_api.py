"""``segany serve``'s API with a tiny random-weight model.

Masks are checked against what :class:`SamPredictor` and :class:`SamAutomaticMaskGenerator`
give directly on the same image, exports are read back with pycocotools, and the store is
checked across app restarts and against two concurrent writers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from browser import live_server
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from reference import TINY_CONFIG, randomize_

from segany import cli
from segany.automatic_mask_generator import SamAutomaticMaskGenerator
from segany.build import build_sam_from_config
from segany.commands import common
from segany.errors import SeganyError
from segany.images import read_image
from segany.masks import coco_to_rle, masks_to_rle, rle_to_coco
from segany.predictor import SamPredictor
from segany.serve import ServeSettings, create_app
from segany.serve.jobs import Job
from segany.serve.library import _inside
from segany.serve.segmenter import ModelLock
from segany.serve.store import NewObject
from segany.zoom_predictor import ZoomPredictor

POINT = [[60.0, 50.0]]
EVERYTHING = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


# The tiny test ViT at a 256-pixel input: a 16 x 16 embedding keeps every test fast.
SMALL_CONFIG = replace(TINY_CONFIG, img_size=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(SMALL_CONFIG), 0).eval()


def blocks(height: int, width: int, seed: int) -> np.ndarray:
    """A (H, W, 3) uint8 picture of coloured 10-pixel blocks."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 10 + 1, width // 10 + 1, 3))
    return np.kron(coarse, np.ones((10, 10, 1)))[:height, :width].astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    """``a.png`` (120 x 160) and ``sub/b.jpg`` (90 x 130)."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(blocks(120, 160, 1)).save(folder / "a.png")
    Image.fromarray(blocks(90, 130, 2)).save(folder / "sub" / "b.jpg", quality=95)
    return folder


@pytest.fixture
def make_client(model, images_dir: Path):
    """``make_client(**settings)``: a TestClient on a new app over ``images_dir``; apps
    made with the same ``project_dir`` share the project (as a restarted server)."""

    def make(**settings) -> TestClient:
        settings.setdefault("project_dir", images_dir / ".segany")
        return TestClient(create_app(model, ServeSettings(images_dir=images_dir, **settings)))

    return make


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def direct_prediction(model, path: Path, **prompts) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) masks and (C,) scores from SamPredictor itself."""
    predictor = SamPredictor(model)
    predictor.set_image(read_image(path))
    masks, scores, _ = predictor.predict(**prompts)
    return masks, scores


def decode(rle: dict) -> np.ndarray:
    """(H, W) bool from a COCO RLE, via pycocotools."""
    coco = {"size": rle["size"], "counts": rle["counts"].encode()}
    return mask_utils.decode(coco).astype(bool)


def encode(mask: np.ndarray) -> dict:
    """COCO RLE (str counts) of an (H, W) bool mask, via pycocotools."""
    coco = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in coco["size"]], "counts": coco["counts"].decode()}


def rectangle(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def create(client: TestClient, image_id: int, mask: np.ndarray, **fields) -> dict:
    response = client.post(f"/api/images/{image_id}/objects", json={"mask": encode(mask), **fields})
    assert response.status_code == 201, response.text
    return response.json()


def assert_one_line_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail
    for word in words:
        assert word in detail, detail


# -------------------------------------------------------------------------------------
# Images
# -------------------------------------------------------------------------------------


def test_images_listed_by_id_with_pixels_as_the_model_sees_them(client, images_dir) -> None:
    listed = client.get("/api/images").json()
    assert [(i["id"], i["name"], i["source"]) for i in listed] == [
        (1, "a.png", "folder"),
        (2, "sub/b.jpg", "folder"),
    ]
    info = client.get("/api/images/2").json()
    assert (info["width"], info["height"]) == (130, 90)
    response = client.get("/api/images/2/pixels")
    assert response.headers["content-type"] == "image/jpeg"
    shown = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    expected = read_image(images_dir / "sub" / "b.jpg").astype(int)
    assert shown.shape == expected.shape
    assert np.abs(shown - expected).mean() < 3  # JPEG re-encoding only
    again = client.get("/api/images/2/pixels", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304
    # A file added later appears on the next listing, with the next id.
    Image.fromarray(blocks(40, 40, 3)).save(images_dir / "c.png")
    assert [i["id"] for i in client.get("/api/images").json()] == [1, 3, 2]


def test_openapi_schema_lists_the_endpoints(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/images",
        "/api/images/{image_id}/predict",
        "/api/images/{image_id}/everything",
        "/api/images/{image_id}/objects",
        "/api/objects/{object_id}",
        "/api/export/coco",
        "/api/export/masks.zip",
    ):
        assert path in paths
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert "app.js" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200


# -------------------------------------------------------------------------------------
# Prediction
# -------------------------------------------------------------------------------------


def test_predict_with_zoom_gives_the_zoom_predictors_masks(
    client, model, images_dir, monkeypatch
) -> None:
    # A random model's masks reach the crop's edges, where zoom keeps the whole image's
    # masks; let the crop's masks through so that the zoomed path is what is compared.
    monkeypatch.setattr(ZoomPredictor, "_cut_by_crop", lambda self, logits, crop: False)
    assert client.get("/api/info").json()["zoom"] is True
    box = [60, 40, 75, 52]
    zoom = ZoomPredictor(SamPredictor(model))
    zoom.set_image(read_image(images_dir / "a.png"))
    masks, scores, _ = zoom.predict(box=np.array(box, float))
    plain, _ = direct_prediction(model, images_dir / "a.png", box=np.array(box, float))
    assert zoom.crop is not None and not np.array_equal(masks, plain)
    for _ in range(2):  # the second time on the kept crop
        body = client.post("/api/images/1/predict", json={"box": box, "zoom": True}).json()
        for candidate, mask, score in zip(body["candidates"], masks, scores, strict=True):
            np.testing.assert_array_equal(decode(candidate["mask"]), mask)
            assert candidate["score"] == pytest.approx(float(score), abs=1e-5)
    unzoomed = client.post("/api/images/1/predict", json={"box": box}).json()["candidates"]
    np.testing.assert_array_equal(decode(unzoomed[0]["mask"]), plain[0])


def test_predict_gives_the_predictors_own_masks(client, model, images_dir) -> None:
    prompts = {"points": [[60.0, 50.0], [100.5, 20.0]], "labels": [1, 0], "box": [10, 5, 150, 110]}
    response = client.post("/api/images/1/predict", json=prompts)
    assert response.status_code == 200, response.text
    body = response.json()
    masks, scores = direct_prediction(
        model,
        images_dir / "a.png",
        point_coords=np.array(prompts["points"]),
        point_labels=np.array(prompts["labels"]),
        box=np.array(prompts["box"], float),
    )
    assert len(body["candidates"]) == 3
    for candidate, mask, score in zip(body["candidates"], masks, scores, strict=True):
        np.testing.assert_array_equal(decode(candidate["mask"]), mask)
        assert candidate["area"] == mask.sum()
        assert candidate["score"] == pytest.approx(float(score), abs=1e-6)
    assert body["best"] == int(np.argmax(scores))
    assert body["embedding"] == "computed"

    single = client.post(
        "/api/images/1/predict", json={"box": [10, 5, 150, 110], "multimask": False}
    )
    masks, _ = direct_prediction(
        model, images_dir / "a.png", box=np.array([10, 5, 150, 110.0]), multimask_output=False
    )
    assert single.json()["embedding"] == "memory"
    [candidate] = single.json()["candidates"]
    np.testing.assert_array_equal(decode(candidate["mask"]), masks[0])


def test_embedding_is_kept_on_disk_across_a_restart(make_client, model, tmp_path) -> None:
    first = make_client()
    assert first.post("/api/images/2/embedding").json()["embedding"] == "computed"
    before = first.post("/api/images/2/predict", json={"points": POINT, "labels": [1]}).json()

    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        restarted = make_client()
        assert restarted.post("/api/images/2/embedding").json()["embedding"] == "disk"
        after = restarted.post("/api/images/2/predict", json={"points": POINT, "labels": [1]})
    finally:
        hook.remove()
    assert calls == []  # the encoder did not run again
    assert after.json()["candidates"] == before["candidates"]

    memory_only = make_client(project_dir=tmp_path / "other", disk_cache=False)
    assert memory_only.post("/api/images/2/embedding").json()["embedding"] == "computed"
    assert not (tmp_path / "other" / "embeddings").exists()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 400, ["at least one point"]),
        ({"points": [[500, 40]], "labels": [1]}, 400, ["outside", "160x120"]),
        ({"points": [[5, 4]], "labels": [1, 0]}, 400, ["1 points but 2 labels"]),
        ({"points": [[5, 4]], "labels": [2]}, 400, ["label 2", "foreground"]),
        ({"box": [50, 50, 10, 10]}, 400, ["x1 < x0"]),
        ({"box": [1, 2, 3]}, 422, ["box"]),
        ({"points": [["a", 4]], "labels": [1]}, 422, ["points.0.0"]),
        ({"points": [[1, 2, 3]], "labels": [1]}, 422, ["points.0"]),
    ],
)
def test_bad_prompts_get_one_line_errors(client, body, status, words) -> None:
    assert_one_line_error(client.post("/api/images/1/predict", json=body), status, *words)


def test_unknown_ids_are_404_and_malformed_ids_422(client) -> None:
    assert_one_line_error(client.get("/api/images/99"), 404, "99")
    assert_one_line_error(client.get("/api/images/99/pixels"), 404)
    assert_one_line_error(client.post("/api/images/99/embedding"), 404)
    assert_one_line_error(client.post("/api/images/99/predict", json={"box": [0, 0, 5, 5]}), 404)
    assert_one_line_error(client.get("/api/images/99/objects"), 404)
    assert_one_line_error(client.get("/api/objects/7"), 404, "7")
    assert_one_line_error(client.patch("/api/objects/7", json={"label": "x"}), 404)
    assert_one_line_error(client.delete("/api/objects/7"), 404)
    assert_one_line_error(client.get("/api/images/abc"), 422, "image_id")
    assert_one_line_error(client.get("/api/images/0"), 422, "image_id")


HUGE = 99999999999999999999  # beyond SQLite's 64-bit integers (was a 500: OverflowError)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/api/images/{HUGE}", None),
        ("GET", f"/api/images/{HUGE}/pixels", None),
        ("POST", f"/api/images/{HUGE}/embedding", None),
        ("POST", f"/api/images/{HUGE}/predict", {"box": [0, 0, 5, 5]}),
        ("POST", f"/api/images/{HUGE}/everything", EVERYTHING),
        ("POST", f"/api/images/{HUGE}/everything/jobs", EVERYTHING),
        ("GET", f"/api/images/{HUGE}/objects", None),
        ("POST", f"/api/images/{HUGE}/proposals/keep", None),
        ("GET", f"/api/objects/{HUGE}", None),
        ("PATCH", f"/api/objects/{HUGE}", {"label": "x"}),
        ("DELETE", f"/api/objects/{HUGE}", None),
        ("GET", f"/api/jobs/{HUGE}", None),
        ("DELETE", f"/api/jobs/{HUGE}", None),
        ("GET", f"/api/objects/{2**63}", None),  # the first integer SQLite cannot hold
    ],
)
def test_ids_beyond_sqlite_integers_are_422(client, method, path, body) -> None:
    assert_one_line_error(client.request(method, path, json=body), 422, "less than or equal")
    assert client.get(f"/api/objects/{2**63 - 1}").status_code == 404  # the largest is fine


# -------------------------------------------------------------------------------------
# Objects
# -------------------------------------------------------------------------------------


def test_object_lifecycle_with_versions(client) -> None:
    mask = rectangle(120, 160, 10, 20, 50, 40)
    prompts = {"points": [[30.0, 30.0]], "labels": [1], "box": None}
    made = client.post(
        "/api/images/1/objects",
        json={"mask": encode(mask), "label": " cat ", "score": 0.9, "prompts": prompts},
    )
    assert made.status_code == 201 and made.headers["etag"] == '"1"'
    obj = made.json()
    assert (obj["label"], obj["source"], obj["version"], obj["score"]) == ("cat", "manual", 1, 0.9)
    assert obj["area"] == mask.sum() == 800
    assert obj["bbox"] == [10.0, 20.0, 40.0, 20.0]
    assert obj["prompts"] == prompts
    np.testing.assert_array_equal(decode(obj["mask"]), mask)
    assert client.get(f"/api/objects/{obj['id']}").json() == obj
    assert client.get("/api/images/1/objects").json() == [obj]
    assert client.get("/api/images/1").json()["objects"] == 1

    renamed = client.patch(
        f"/api/objects/{obj['id']}", json={"label": "dog"}, headers={"If-Match": '"1"'}
    )
    assert renamed.status_code == 200 and renamed.headers["etag"] == '"2"'
    assert renamed.json()["label"] == "dog" and renamed.json()["mask"] == obj["mask"]

    stale = client.patch(
        f"/api/objects/{obj['id']}", json={"label": "bird"}, headers={"If-Match": '"1"'}
    )
    assert_one_line_error(stale, 412, "changed elsewhere")
    assert_one_line_error(
        client.delete(f"/api/objects/{obj['id']}", headers={"If-Match": '"1"'}), 412
    )
    assert_one_line_error(
        client.patch(f"/api/objects/{obj['id']}", json={}, headers={"If-Match": "x"}), 400
    )

    # A change with a bad part changes nothing.
    bad = client.patch(
        f"/api/objects/{obj['id']}", json={"label": "bird", "mask": encode(np.ones((5, 5), bool))}
    )
    assert_one_line_error(bad, 400, "5x5", "160x120")
    assert client.get(f"/api/objects/{obj['id']}").json()["label"] == "dog"

    # New mask: area and box follow; the uncompressed RLE form is accepted too.
    other = rectangle(120, 160, 0, 0, 3, 2)
    rle = masks_to_rle(torch.from_numpy(other)[None])[0]
    moved = client.patch(f"/api/objects/{obj['id']}", json={"mask": rle}).json()
    assert (moved["area"], moved["bbox"], moved["version"]) == (6, [0.0, 0.0, 3.0, 2.0], 3)

    assert (
        client.delete(f"/api/objects/{obj['id']}", headers={"If-Match": '"3"'}).status_code == 204
    )
    assert client.get(f"/api/objects/{obj['id']}").status_code == 404


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        ({"size": [120, 160], "counts": [5, 10]}, ["15 pixels"]),
        ({"size": [120, 160], "counts": [19200]}, ["empty"]),
        ({"size": [120, 160], "counts": "\x7f!"}, ["malformed"]),
        ({"size": [120, 160], "counts": [-1, 19201]}, ["non-negative"]),
        ({"size": [12, 16], "counts": [0, 192]}, ["16x12"]),
    ],
)
def test_bad_masks_are_refused(client, mask, words) -> None:
    response = client.post("/api/images/1/objects", json={"mask": mask})
    assert_one_line_error(response, 400, *words)
    assert client.get("/api/images/1/objects").json() == []


def test_non_finite_numbers_are_refused(client) -> None:
    """Python's json reads NaN and Infinity; stored, they broke every later export."""
    made = create(client, 1, rectangle(120, 160, 0, 0, 5, 5))
    mask = encode(rectangle(120, 160, 1, 1, 9, 9))
    for method, path, body in (
        ("POST", "/api/images/1/objects", {"mask": mask, "score": math.inf}),
        ("POST", "/api/images/1/objects", {"mask": mask, "prompts": {"points": [[math.nan, 1]]}}),
        ("PATCH", f"/api/objects/{made['id']}", {"score": -math.inf}),
        ("PATCH", f"/api/objects/{made['id']}", {"prompts": {"box": [0, 0, math.inf, 5]}}),
        ("POST", "/api/images/1/predict", {"points": [[math.nan, 5]], "labels": [1]}),
    ):
        response = client.request(
            method, path, content=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        assert_one_line_error(response, 422, "finite number")
    assert client.get("/api/images/1/objects").json() == [made]
    assert client.get("/api/export/coco").status_code == 200

    # The store refuses them too, whoever writes (and rolls back the whole change).
    store = client.app.state.project.store
    good = NewObject(mask=mask, area=64, bbox=[1, 1, 8, 8])
    for bad in (replace(good, score=math.nan), replace(good, prompts={"box": [0, 0, math.inf, 1]})):
        with pytest.raises(SeganyError, match="finite"):
            store.create_objects(1, [good, bad])
    assert [obj.id for obj in store.objects()] == [made["id"]]


def test_rle_strings_round_trip_and_bad_ones_are_caught() -> None:
    rng = np.random.default_rng(0)
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random((37, 53)) < density
        coco = encode(mask)
        rle = coco_to_rle(coco)
        assert sum(rle["counts"]) == 37 * 53
        assert rle_to_coco(rle) == coco
    with pytest.raises(ValueError, match="middle of a number"):
        coco_to_rle({"size": [2, 2], "counts": "0P"})  # 'P' = 32 + 48: more groups follow


def test_everything_stores_the_generators_masks_as_proposals(client, model, images_dir) -> None:
    response = client.post("/api/images/1/everything", json=EVERYTHING)
    assert response.status_code == 200, response.text
    proposals = response.json()
    generator = SamAutomaticMaskGenerator(model, output_mode="uncompressed_rle", **EVERYTHING)
    direct = [r for r in generator.generate(read_image(images_dir / "a.png")) if r["area"] > 0]
    assert len(proposals) == len(direct) > 0
    for proposal, record in zip(proposals, direct, strict=True):
        assert proposal["source"] == "proposal"
        assert proposal["mask"] == rle_to_coco(record["segmentation"])
        assert proposal["score"] == pytest.approx(record["predicted_iou"], abs=1e-6)
        assert proposal["prompts"]["points"] == record["point_coords"]

    # A second run replaces the proposals; keep and discard work on the current ones.
    manual = create(client, 1, rectangle(120, 160, 0, 0, 10, 10))
    again = client.post("/api/images/1/everything", json=EVERYTHING).json()
    ids = {o["id"] for o in client.get("/api/images/1/objects").json()}
    assert ids == {manual["id"]} | {o["id"] for o in again}
    assert client.post("/api/images/1/proposals/keep").json() == {"count": len(again)}
    sources = [o["source"] for o in client.get("/api/images/1/objects").json()]
    assert sources == ["manual"] + ["auto"] * len(again)
    client.post("/api/images/1/everything", json=EVERYTHING)
    assert client.delete("/api/images/1/proposals").json() == {"count": len(again)}
    assert len(client.get("/api/images/1/objects").json()) == 1 + len(again)
    assert_one_line_error(
        client.post("/api/images/1/everything", json={"points_per_side": 0}), 422, "points_per_side"
    )


# -------------------------------------------------------------------------------------
# Persistence and concurrency
# -------------------------------------------------------------------------------------


def test_nothing_is_lost_across_a_restart(make_client, images_dir) -> None:
    first = make_client()
    made = [
        create(first, 1, rectangle(120, 160, 0, 0, 20, 20), label="cat", score=0.5),
        create(first, 2, rectangle(90, 130, 5, 5, 9, 9), label="dog"),
    ]
    first.patch(f"/api/objects/{made[0]['id']}", json={"label": "tiger"})
    del first  # the server goes away without any shutdown step

    restarted = make_client()
    assert [i["name"] for i in restarted.get("/api/images").json()] == ["a.png", "sub/b.jpg"]
    kept = (
        restarted.get("/api/images/1/objects").json()
        + restarted.get("/api/images/2/objects").json()
    )
    assert [(o["id"], o["label"], o["version"]) for o in kept] == [
        (made[0]["id"], "tiger", 2),
        (made[1]["id"], "dog", 1),
    ]
    assert [o["mask"] for o in kept] == [o["mask"] for o in made]
    database = images_dir / ".segany" / "project.sqlite"
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_two_concurrent_writers(make_client, images_dir) -> None:
    tabs = [make_client(), make_client()]  # two apps on one project, as two servers
    shared = create(tabs[0], 1, rectangle(120, 160, 0, 0, 5, 5), label="start")
    rounds = 12
    start = threading.Barrier(2)

    def write(tab: TestClient, name: str) -> list[int]:
        start.wait()
        statuses = []
        for i in range(rounds):
            made = tab.post(
                "/api/images/1/objects",
                json={
                    "mask": encode(rectangle(120, 160, i, i, i + 3, i + 3)),
                    "label": f"{name}{i}",
                },
            )
            renamed = tab.patch(f"/api/objects/{shared['id']}", json={"label": f"{name}{i}"})
            statuses += [made.status_code, renamed.status_code]
        return statuses

    with ThreadPoolExecutor(2) as pool:
        statuses = [s for result in pool.map(write, tabs, "ab") for s in result]
    assert set(statuses) == {200, 201}
    objects = tabs[1].get("/api/images/1/objects").json()
    labels = sorted(o["label"] for o in objects if o["id"] != shared["id"])
    assert labels == sorted(f"{n}{i}" for n in "ab" for i in range(rounds))
    now = tabs[1].get(f"/api/objects/{shared['id']}").json()
    assert now["version"] == 1 + 2 * rounds  # every write applied, none lost or merged
    assert now["label"] in {f"a{rounds - 1}", f"b{rounds - 1}"}

    # Both tabs change the object they both read: exactly one wins, the other gets 412.
    def conditional(tab: TestClient, label: str) -> int:
        start.wait()
        headers = {"If-Match": f'"{now["version"]}"'}
        return tab.patch(
            f"/api/objects/{shared['id']}", json={"label": label}, headers=headers
        ).status_code

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(conditional, tabs, ["x", "y"])) == [200, 412]
    final = tabs[0].get(f"/api/objects/{shared['id']}").json()
    assert final["version"] == now["version"] + 1 and final["label"] in {"x", "y"}
    with sqlite3.connect(images_dir / ".segany" / "project.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -------------------------------------------------------------------------------------
# Export
# -------------------------------------------------------------------------------------


@pytest.fixture
def annotated(client, model, images_dir) -> dict[int, tuple[np.ndarray, str]]:
    """Kept objects, two made from the predictor's own masks:
    {object id: (expected (H, W) mask, expected category)}; plus one proposal."""
    expected = {}
    masks, _ = direct_prediction(
        model, images_dir / "a.png", point_coords=np.array(POINT), point_labels=np.array([1])
    )
    candidates = client.post("/api/images/1/predict", json={"points": POINT, "labels": [1]})
    for index, label in ((0, "cat"), (2, "dog")):
        chosen = candidates.json()["candidates"][index]
        made = create(client, 1, decode(chosen["mask"]), label=label, score=chosen["score"])
        expected[made["id"]] = (masks[index], label)
    b_mask = rectangle(90, 130, 30, 10, 60, 70)
    expected[create(client, 2, b_mask)["id"]] = (b_mask, "object")  # unlabelled
    create(client, 2, rectangle(90, 130, 0, 0, 4, 4), source="proposal", label="maybe")
    return expected


def read_coco(document: dict, folder: Path) -> COCO:
    path = folder / "instances.json"
    path.write_text(json.dumps(document))
    return COCO(str(path))


def test_coco_export_reads_back_with_pycocotools(client, annotated, tmp_path) -> None:
    response = client.get("/api/export/coco")
    assert "attachment" in response.headers["content-disposition"]
    coco = read_coco(response.json(), tmp_path)
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["cat", "dog", "object"]
    images = {i["id"]: i for i in coco.loadImgs(coco.getImgIds())}
    assert {i: (v["file_name"], v["width"], v["height"]) for i, v in images.items()} == {
        1: ("a.png", 160, 120),
        2: ("sub/b.jpg", 130, 90),
    }
    annotations = coco.loadAnns(coco.getAnnIds())
    assert sorted(a["segany_object_id"] for a in annotations) == sorted(annotated)
    for annotation in annotations:
        mask, category = annotated[annotation["segany_object_id"]]
        np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), mask)
        assert annotation["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert annotation["bbox"] == [xs.min(), ys.min(), width, height]
        assert coco.loadCats(annotation["category_id"])[0]["name"] == category
    with_proposals = client.get("/api/export/coco", params={"include_proposals": "true"}).json()
    assert len(with_proposals["annotations"]) == len(annotated) + 1
    assert "maybe" in {c["name"] for c in with_proposals["categories"]}


def test_png_export_zip_and_folder(client, annotated, images_dir) -> None:
    response = client.get("/api/export/masks.zip")
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read("objects.csv").decode())))
        assert sorted(int(r["object_id"]) for r in rows) == sorted(annotated)
        for row in rows:
            pixels = np.asarray(Image.open(io.BytesIO(archive.read(row["mask_file"]))))
            assert set(np.unique(pixels)) <= {0, 255}
            np.testing.assert_array_equal(pixels == 255, annotated[int(row["object_id"])][0])

    written = client.post("/api/export", json={"format": "png"}).json()["path"]
    folder = Path(written)
    assert folder.parent == images_dir / ".segany" / "exports"
    assert len(list(folder.glob("*/*.png"))) == len(annotated)
    coco_file = Path(client.post("/api/export", json={"format": "coco"}).json()["path"])
    assert coco_file.parent == folder.parent
    assert len(COCO(str(coco_file)).getAnnIds()) == len(annotated)


# -------------------------------------------------------------------------------------
# Uploads and safety
# -------------------------------------------------------------------------------------


def test_uploads_are_decoded_and_kept_in_the_project(client, images_dir, tmp_path) -> None:
    data = png_bytes(blocks(50, 70, 4))
    response = client.post(
        "/api/images", files={"file": ("../../evil name.png", data, "image/png")}
    )
    assert response.status_code == 201, response.text
    image = response.json()
    assert (image["source"], image["width"], image["height"]) == ("upload", 70, 50)
    assert "/" not in image["name"] and image["name"].endswith("-evil_name.png")
    assert (images_dir / ".segany" / "uploads" / image["name"]).is_file()
    assert not (tmp_path / "evil name.png").exists() and not (images_dir / "evil name.png").exists()
    again = client.post("/api/images", files={"file": ("copy.png", data, "image/png")})
    assert again.json() == image  # same content, same image
    shown = Image.open(io.BytesIO(client.get(f"/api/images/{image['id']}/pixels").content))
    assert shown.size == (70, 50)
    assert (
        client.post(
            f"/api/images/{image['id']}/predict", json={"points": [[3, 3]], "labels": [1]}
        ).status_code
        == 200
    )

    refused = client.post("/api/images", files={"file": ("notes.png", b"just text", "image/png")})
    assert_one_line_error(refused, 415, "not an image")
    uploads = sorted(p.name for p in (images_dir / ".segany" / "uploads").iterdir())
    assert not any("notes" in name for name in uploads)


def test_too_large_bodies_are_413(make_client) -> None:
    client = make_client(max_upload_bytes=4000)
    noise = np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    data = png_bytes(noise)
    assert len(data) > 4000
    assert_one_line_error(
        client.post("/api/images", files={"file": ("big.png", data)}), 413, "limit"
    )

    def chunks():  # no Content-Length: the limit applies while the body streams in
        boundary = b'--x\r\nContent-Disposition: form-data; name="file"; filename="b.png"\r\n\r\n'
        yield boundary
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]
        yield b"\r\n--x--\r\n"

    streamed = client.post(
        "/api/images", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert_one_line_error(streamed, 413, "limit")
    assert len(client.get("/api/images").json()) == 2


def test_nothing_outside_the_folder_can_be_read(client, images_dir, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(blocks(30, 30, 9)).save(outside / "secret.png")
    (images_dir / "link.png").symlink_to(outside / "secret.png")
    (images_dir / "linked").symlink_to(outside, target_is_directory=True)
    names = [i["name"] for i in client.get("/api/images").json()]
    assert names == ["a.png", "sub/b.jpg"]

    for path in (
        "/api/images/..%2F..%2Foutside%2Fsecret.png/pixels",
        "/api/images/%2e%2e/pixels",
        "/api/images/1%2F..%2F..%2Foutside/pixels",
        "/static/..%2F..%2Fapp.py",
        "/static/%2e%2e/app.py",
        "/static/..%2Fstore.py",
    ):
        response = client.get(path)
        assert response.status_code in (404, 422), path
        assert b"def " not in response.content and b"PNG" not in response.content

    # A known image whose file is swapped for a link to the outside is no longer served.
    (images_dir / "a.png").unlink()
    (images_dir / "a.png").symlink_to(outside / "secret.png")
    assert_one_line_error(client.get("/api/images/1/pixels"), 404, "not available")
    assert_one_line_error(client.post("/api/images/1/embedding"), 404)
    assert_one_line_error(client.post("/api/images/1/predict", json={"box": [0, 0, 5, 5]}), 404)

    for name in ("../outside/secret.png", "/etc/passwd", "sub/../../x.png", "sub\\..\\x", ""):
        assert _inside(images_dir, name) is None


def test_token_is_required_on_every_api_call(make_client) -> None:
    client = make_client(token="s3cret")
    for method, path in (
        ("GET", "/api/images"),
        ("GET", "/api/info"),
        ("POST", "/api/images/1/predict"),
        ("GET", "/api/export/coco"),
        ("DELETE", "/api/objects/1"),
    ):
        assert_one_line_error(client.request(method, path), 401, "token")
    wrong = client.get("/api/images", headers={"Authorization": "Bearer nope"})
    assert_one_line_error(wrong, 401)
    assert client.get("/api/images", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself holds no data

    login = client.get("/?token=s3cret", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"].lower()
    assert "segany_token=s3cret" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/images").status_code == 200  # the client kept the cookie
    client.cookies.clear()
    assert client.get("/?token=guess", follow_redirects=False).status_code == 200
    assert client.get("/api/images").status_code == 401


def test_loopback_server_accepts_only_local_host_names(make_client) -> None:
    client = make_client(allowed_hosts=("127.0.0.1", "localhost", "[::1]"))
    assert_one_line_error(client.get("/api/images"), 400, "testserver")
    assert_one_line_error(client.get("/", headers={"Host": "evil.example:8000"}), 400)
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"):
        assert client.get("/api/images", headers={"Host": host}).status_code == 200


def test_changes_from_other_sites_are_refused(client) -> None:
    data = {"file": ("x.png", png_bytes(blocks(20, 20, 5)), "image/png")}
    evil = {"Origin": "http://evil.example"}
    assert_one_line_error(client.post("/api/images", files=data, headers=evil), 403, "another site")
    assert_one_line_error(client.post("/api/images/1/everything", headers=evil), 403)
    assert client.get("/api/images", headers=evil).status_code == 200  # reading is harmless
    own = {"Origin": "http://testserver"}
    assert client.post("/api/images", files=data, headers=own).status_code == 201


# -------------------------------------------------------------------------------------
# Work limits and the job queue
# -------------------------------------------------------------------------------------


@pytest.fixture
def paused_jobs(monkeypatch):
    """Jobs stop between their first and second decoder batch (the model free) until
    ``paused_jobs.go`` is set; ``paused_jobs.reached`` is set when one gets there."""
    gate = SimpleNamespace(reached=threading.Event(), go=threading.Event())
    progress = Job.progress

    def pausing(job: Job, done: int, total: int) -> None:
        progress(job, done, total)
        if done >= 1 and not gate.go.is_set():
            gate.reached.set()
            gate.go.wait(60)
            progress(job, done, total)  # where a job cancelled meanwhile stops

    monkeypatch.setattr(Job, "progress", pausing)
    yield gate
    gate.go.set()  # never leave a worker waiting


def finished_job(client: httpx.Client, job_id: int) -> dict:
    """The job once it has finished (polls; the worker is another thread)."""
    for _ in range(1200):
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_everything_work_is_bounded(client, make_client) -> None:
    limits = client.get("/api/info").json()
    assert (limits["max_points_per_side"], limits["max_crop_n_layers"]) == (64, 1)
    assert limits["max_everything_prompts"] == 32 * 32 * 5
    for options, status, words in (
        ({"points_per_side": 65}, 422, ["points_per_side", "less than or equal to 64"]),
        ({"crop_n_layers": 2}, 422, ["crop_n_layers", "less than or equal to 1"]),
        ({"points_per_side": 64, "crop_n_layers": 1}, 400, ["20480 prompts", "allows 5120"]),
    ):
        for path in ("/api/images/1/everything", "/api/images/1/everything/jobs"):
            assert_one_line_error(client.post(path, json=options), status, *words)
    small = make_client(
        project_dir=client.app.state.project.settings.project_dir / "small",
        max_everything_prompts=16,
    )
    assert_one_line_error(small.post("/api/images/1/everything"), 400, "1024 prompts")
    assert small.post("/api/images/1/everything", json=EVERYTHING).status_code == 200
    assert client.get("/api/jobs").json() == []  # nothing refused was queued


def test_jobs_queue_report_progress_and_cancel(client, paused_jobs) -> None:
    options = {**EVERYTHING, "points_per_side": 8}  # 64 prompts: 4 decoder batches of 16
    started = client.post("/api/images/1/everything/jobs", json=options)
    assert started.status_code == 202, started.text
    first = started.json()
    assert started.headers["location"] == f"/api/jobs/{first['id']}"
    assert first["status"] in ("queued", "running") and first["objects"] is None
    assert paused_jobs.reached.wait(60)
    second = client.post("/api/images/2/everything/jobs", json=EVERYTHING).json()
    queue = client.get("/api/jobs").json()
    assert [(j["id"], j["status"], j["position"]) for j in queue] == [
        (first["id"], "running", 0),
        (second["id"], "queued", 1),
    ]
    assert queue[0]["progress"] == 0.25 and queue[0]["options"]["points_per_side"] == 8

    # Clicks are answered while the job is between batches.
    click = client.post("/api/images/1/predict", json={"points": POINT, "labels": [1]})
    assert click.status_code == 200, click.text

    dropped = client.delete(f"/api/jobs/{second['id']}").json()
    assert (dropped["status"], dropped["position"]) == ("cancelled", None)
    assert client.delete(f"/api/jobs/{first['id']}").json()["status"] == "cancelling"
    paused_jobs.go.set()
    stopped = finished_job(client, first["id"])
    assert stopped["status"] == "cancelled" and "cancelled" in stopped["error"]
    assert stopped["progress"] == 0.25  # it stopped after its first batch
    assert client.get("/api/images/1/objects").json() == []  # and wrote nothing
    assert client.get("/api/images/2/objects").json() == []

    # A job left alone runs to the end; its proposals are stored and come with it.
    done = finished_job(
        client, client.post("/api/images/1/everything/jobs", json=EVERYTHING).json()["id"]
    )
    assert (done["status"], done["progress"], done["position"]) == ("done", 1.0, None)
    assert done["objects"] and done["objects"] == client.get("/api/images/1/objects").json()
    assert client.delete(f"/api/jobs/{done['id']}").json()["status"] == "done"  # too late
    assert_one_line_error(client.get("/api/jobs/999"), 404, "no job")
    assert_one_line_error(client.post("/api/images/99/everything/jobs"), 404)


def test_waiting_everything_request_is_409_when_its_job_is_cancelled(client, paused_jobs):
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.post, "/api/images/1/everything", json=EVERYTHING)
        assert paused_jobs.reached.wait(60)
        [job] = client.get("/api/jobs").json()
        client.delete(f"/api/jobs/{job['id']}")
        paused_jobs.go.set()
        assert_one_line_error(waiting.result(60), 409, "cancelled")
    assert client.get("/api/images/1/objects").json() == []


def test_a_dropped_everything_request_cancels_its_job(model, images_dir, paused_jobs) -> None:
    settings = ServeSettings(images_dir=images_dir, project_dir=images_dir / ".segany")
    with live_server(create_app(model, settings)) as url, httpx.Client(base_url=url) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            client.post("/api/images/1/everything", json=EVERYTHING, timeout=1)
        for _ in range(600):  # the server notices, while the job waits between batches
            [job] = client.get("/api/jobs").json()
            if job["status"] == "cancelling":
                break
            time.sleep(0.02)
        paused_jobs.go.set()
        assert finished_job(client, job["id"])["status"] == "cancelled"
        assert client.get("/api/images/1/objects").json() == []


def test_a_full_queue_is_429(make_client, images_dir, paused_jobs) -> None:
    client = make_client(max_queued_jobs=1)
    ids = [client.post("/api/images/1/everything/jobs", json=EVERYTHING).json()["id"]]
    assert paused_jobs.reached.wait(60)  # the first runs; one more may wait
    ids.append(client.post("/api/images/2/everything/jobs", json=EVERYTHING).json()["id"])
    full = client.post("/api/images/2/everything/jobs", json=EVERYTHING)
    assert_one_line_error(full, 429, "waiting")
    assert_one_line_error(client.post("/api/images/2/everything", json=EVERYTHING), 429)
    for job_id in ids:
        client.delete(f"/api/jobs/{job_id}")
    paused_jobs.go.set()
    assert [finished_job(client, i)["status"] for i in ids] == ["cancelled", "cancelled"]


def test_the_model_lock_lets_waiting_clicks_go_before_a_job_step() -> None:
    lock, order = ModelLock(), []

    def take(kind: str) -> None:
        with getattr(lock, kind)():
            order.append(kind)

    with lock.interactive():  # a click holds the model; a job step and a click queue up
        threads = [threading.Thread(target=take, args=(kind,)) for kind in ("step", "interactive")]
        for thread in threads:
            thread.start()
        while lock._interactive_waiting == 0:  # the click is waiting (the step may be too)
            time.sleep(0.001)
    for thread in threads:
        thread.join(10)
    assert order == ["interactive", "step"]


def test_clicks_are_served_while_a_long_job_runs(client) -> None:
    """Only that clicks complete: how fast is for benchmarks/bench_serve_latency.py."""
    client.post("/api/images/1/embedding")
    long_job = {**EVERYTHING, "points_per_side": 64}  # 4,096 prompts, 64 decoder batches
    job = client.post("/api/images/1/everything/jobs", json=long_job).json()
    for x in range(10, 130, 12):
        click = client.post("/api/images/1/predict", json={"points": [[x, 50]], "labels": [1]})
        assert click.status_code == 200, click.text
        assert len(click.json()["candidates"]) == 3
    client.delete(f"/api/jobs/{job['id']}")
    assert finished_job(client, job["id"])["status"] in ("cancelled", "done")


# -------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------


def test_cli_serve_builds_the_app_and_binds_to_loopback(
    model, images_dir, monkeypatch, capsys
) -> None:
    import uvicorn

    runs = []
    monkeypatch.setattr(common, "load_model", lambda name, checkpoint, device: model)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append((app, options)))
    monkeypatch.setenv("SEGANY_TOKEN", "from-env")
    assert cli.main(["serve", str(images_dir), "--port", "8123", "--device", "cpu"]) == 0
    [(app, options)] = runs
    assert (options["host"], options["port"]) == ("127.0.0.1", 8123)
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8123/?token=from-env" in out
    client = TestClient(app, base_url="http://127.0.0.1:8123")
    assert client.get("/api/images").status_code == 401
    headers = {"Authorization": "Bearer from-env"}
    assert len(client.get("/api/images", headers=headers).json()) == 2
    assert (images_dir / ".segany" / "project.sqlite").is_file()

    monkeypatch.delenv("SEGANY_TOKEN")
    assert (
        cli.main(
            [
                "serve",
                str(images_dir),
                "--host",
                "0.0.0.0",
                "--project",
                str(images_dir.parent / "p"),
            ]
        )
        == 0
    )
    assert "without a token" in capsys.readouterr().out
    assert runs[-1][1]["host"] == "0.0.0.0"

    assert cli.main(["serve", str(images_dir / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segany serve: error:") and "not a folder" in err and "\n" not in err


def test_patch_with_null_mask_or_source_keeps_them(client) -> None:
    """Found by tests/test_fuzz_api.py: ``"mask": null`` in a PATCH gave a 500."""
    mask = rectangle(120, 160, 10, 20, 50, 40)
    obj = client.post("/api/images/1/objects", json={"mask": encode(mask)}).json()
    changed = client.patch(
        f"/api/objects/{obj['id']}",
        json={"mask": None, "source": None, "label": "box", "score": None},
    )
    assert changed.status_code == 200
    assert changed.json()["mask"] == obj["mask"] and changed.json()["source"] == obj["source"]
    assert changed.json()["label"] == "box"

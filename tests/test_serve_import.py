"""``segany serve --import-coco``: the data engine's loop through the annotation tool.

A hand-made COCO file (a polygon, an uncompressed RLE, a crowd region and two proposals in
``segany engine propose``'s format, plus an annotation of an image that is not in the
folder) is imported; masks are checked against pycocotools' own decoding and hand-made
arrays, proposals are kept or deleted through the API, and the export is read back with
pycocotools and with ``segany engine retrain``'s own reader of accepted annotations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from reference import randomize_
from test_serve_api import SMALL_CONFIG, blocks, decode, rectangle

from segany import cli
from segany.build import build_sam_from_config
from segany.commands import common
from segany.engine.propose import is_proposal, proposal_category_ids
from segany.engine.retrain import accepted_data
from segany.serve import ServeSettings, create_app, import_coco
from segany.serve.importer import ImageFinder
from segany.serve.store import StoredImage

A_SIZE, B_SIZE = (40, 60), (30, 50)  # (height, width) of a.png and sub/b.png
POLYGON = [[5.0, 4.0, 30.0, 4.0, 30.0, 22.0, 12.0, 30.0]]  # on a.png
RLE_BOX = (10, 3, 35, 20)  # x0, y0, x1, y1 of the uncompressed RLE object on sub/b.png
KEPT_BOX = (40, 25, 58, 38)  # the proposal on a.png, to be kept
DELETED_BOX = (0, 22, 12, 30)  # the proposal on sub/b.png, to be deleted
KEPT_MARK = {
    "proposal": True,
    "predicted_iou": 0.91,
    "stability_score": 0.97,
    "point_coords": [[49.0, 31.0]],
    "overlap": 0.0,
}
DELETED_MARK = {**KEPT_MARK, "predicted_iou": 0.8, "point_coords": [[6.0, 26.0]]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(SMALL_CONFIG), 0).eval()


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return rectangle(*size, x0, y0, x1, y1)


def polygon_mask() -> np.ndarray:
    """The polygon as pycocotools rasterises it."""
    rles = mask_utils.frPyObjects(POLYGON, *A_SIZE)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def uncompressed(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE, computed here: column-major runs, starting with zeros."""
    flat = mask.flatten(order="F").astype(int)
    edges = [0, *(np.flatnonzero(np.diff(flat)) + 1), flat.size]
    counts = np.diff(edges).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def compressed(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": encoded["counts"].decode()}


def proposal(ann_id: int, image_id: int, mask: np.ndarray, mark: dict) -> dict:
    """An annotation as ``segany engine propose`` appends it."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 9,
        "segmentation": compressed(mask),
        "area": int(mask.sum()),
        "bbox": [0, 0, 1, 1],
        "iscrowd": 0,
        "score": mark["predicted_iou"],
        "segany": dict(mark),
    }


def proposed_coco() -> dict:
    """The file ``segany engine propose`` would write for the test folder."""
    return {
        "info": {"description": "hand-made"},
        "images": [
            {"id": 10, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 11, "file_name": "images/sub/b.png", "height": 30, "width": 50},
            {"id": 12, "file_name": "gone.png", "height": 40, "width": 60},
        ],
        "categories": [
            {"id": 1, "name": "cat", "supercategory": "animal"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
            {"id": 9, "name": "segany_proposal", "supercategory": "segany"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "segmentation": POLYGON, "iscrowd": 0},
            {
                "id": 2,
                "image_id": 11,
                "category_id": 2,
                "segmentation": uncompressed(box_mask(B_SIZE, RLE_BOX)),
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 10,
                "category_id": 1,
                "segmentation": uncompressed(box_mask(A_SIZE, (0, 0, 4, 4))),
                "iscrowd": 1,
            },
            {"id": 4, "image_id": 12, "category_id": 1, "segmentation": POLYGON, "iscrowd": 0},
            proposal(5, 10, box_mask(A_SIZE, KEPT_BOX), KEPT_MARK),
            proposal(6, 11, box_mask(B_SIZE, DELETED_BOX), DELETED_MARK),
        ],
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """``a.png`` (40 x 60) and ``sub/b.png`` (30 x 50)."""
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(blocks(*A_SIZE, 1)).save(images / "a.png")
    Image.fromarray(blocks(*B_SIZE, 2)).save(images / "sub" / "b.png")
    return images


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    path = tmp_path / "proposed.json"
    path.write_text(json.dumps(proposed_coco()))
    return path


@pytest.fixture
def client(model, folder: Path) -> TestClient:
    settings = ServeSettings(images_dir=folder, project_dir=folder / ".segany")
    return TestClient(create_app(model, settings))


def store_of(client: TestClient):
    return client.app.state.project.store


def objects_by_image(client: TestClient) -> dict[str, list[dict]]:
    """{image name: its objects} through the API."""
    return {
        image["name"]: client.get(f"/api/images/{image['id']}/objects").json()
        for image in client.get("/api/images").json()
    }


def write(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


# -------------------------------------------------------------------------------------
# The loop
# -------------------------------------------------------------------------------------


def test_import_shows_objects_and_proposals_with_the_files_masks(client, folder, coco_file):
    report = import_coco(store_of(client), coco_file, folder)
    assert (report.objects, report.proposals, report.images) == (2, 2, 2)
    assert report.already_imported == 0
    skipped = {reason: (s.annotations, s.images) for reason, s in report.skipped.items()}
    assert skipped == {
        "image not in the folder": (1, ["gone.png"]),
        "crowd regions": (1, ["a.png"]),
    }
    assert any("gone.png" in line for line in report.lines())

    objects = objects_by_image(client)
    a, b = objects["a.png"], objects["sub/b.png"]
    assert [(o["source"], o["label"], o["score"]) for o in a] == [
        ("manual", "cat", None),
        ("proposal", "", 0.91),
    ]
    assert [(o["source"], o["label"], o["score"]) for o in b] == [
        ("manual", "dog", None),
        ("proposal", "", 0.8),
    ]
    expected = [
        polygon_mask(),
        box_mask(A_SIZE, KEPT_BOX),
        box_mask(B_SIZE, RLE_BOX),
        box_mask(B_SIZE, DELETED_BOX),
    ]
    for obj, mask in zip(a + b, expected, strict=True):
        np.testing.assert_array_equal(decode(obj["mask"]), mask)
        assert obj["area"] == mask.sum()
    assert a[1]["prompts"]["points"] == KEPT_MARK["point_coords"]
    listed = {i["name"]: (i["objects"], i["proposals"]) for i in client.get("/api/images").json()}
    assert listed == {"a.png": (1, 1), "sub/b.png": (1, 1)}


def test_pending_proposals_export_with_propose_s_mark(client, folder, coco_file, tmp_path):
    import_coco(store_of(client), coco_file, folder)
    exported = client.get("/api/export/coco", params={"include_proposals": "true"}).json()
    categories = proposal_category_ids(exported)
    marks = {
        a["segany_object_id"]: (a.get("segany"), is_proposal(a, categories))
        for a in exported["annotations"]
    }
    assert sorted(marks.values(), key=str) == sorted(
        [(None, False), (None, False), (KEPT_MARK, True), (DELETED_MARK, True)], key=str
    )
    # retrain's own reader: the originals are accepted, both proposals left out.
    accepted = accepted_data(write(tmp_path / "pending.json", exported), folder)
    assert accepted.proposals_left_out == 2
    assert sum(len(v) for v in accepted.annotations.values()) == 2


def test_kept_and_deleted_proposals_export_as_retrain_expects(client, folder, coco_file, tmp_path):
    import_coco(store_of(client), coco_file, folder)
    objects = objects_by_image(client)
    kept, deleted = objects["a.png"][1], objects["sub/b.png"][1]
    response = client.patch(
        f"/api/objects/{kept['id']}",
        json={"source": "auto"},  # the page's ✓
        headers={"If-Match": f'"{kept["version"]}"'},
    )
    assert response.status_code == 200, response.text
    assert client.delete(f"/api/objects/{deleted['id']}").status_code == 204

    for include_proposals in ("false", "true"):  # nothing is pending any more
        exported = client.get(
            "/api/export/coco", params={"include_proposals": include_proposals}
        ).json()
        path = write(tmp_path / "accepted.json", exported)
        coco = COCO(str(path))
        names = {i["id"]: i["file_name"] for i in exported["images"]}
        category = {c["id"]: c["name"] for c in exported["categories"]}
        found = {
            (names[a["image_id"]], category[a["category_id"]], a["source"]): (a, coco.annToMask(a))
            for a in exported["annotations"]
        }
        expected = {
            ("a.png", "cat", "manual"): polygon_mask(),
            ("a.png", "object", "auto"): box_mask(A_SIZE, KEPT_BOX),
            ("sub/b.png", "dog", "manual"): box_mask(B_SIZE, RLE_BOX),
        }
        assert found.keys() == expected.keys()
        for key, mask in expected.items():
            annotation, decoded = found[key]
            np.testing.assert_array_equal(decoded.astype(bool), mask)
            assert "segany" not in annotation  # no proposal mark
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert (annotation["area"], annotation["bbox"]) == (mask.sum(), box)
        assert found[("a.png", "object", "auto")][0]["predicted_iou"] == 0.91

        accepted = accepted_data(path, folder)
        assert accepted.proposals_left_out == 0
        assert sum(len(v) for v in accepted.annotations.values()) == 3
        assert sorted(p.name for _, p in accepted.images) == ["a.png", "b.png"]


def test_importing_again_adds_nothing(client, folder, coco_file, tmp_path):
    store = store_of(client)
    import_coco(store, coco_file, folder)
    first = {o.id: o for o in store.objects()}
    again = import_coco(store, coco_file, folder)
    assert (again.objects, again.proposals, again.already_imported) == (0, 0, 4)
    assert {o.id: o for o in store.objects()} == first

    # A deleted proposal stays deleted; the project's own export adds nothing either.
    deleted = next(o for o in first.values() if o.source == "proposal" and o.image_id == 1)
    store.delete_object(deleted.id, None)
    exported = write(tmp_path / "export.json", client.get("/api/export/coco").json())
    for path in (coco_file, exported):
        report = import_coco(store, path, folder)
        assert (report.objects, report.proposals) == (0, 0)
    assert sorted(o.id for o in store.objects()) == sorted(set(first) - {deleted.id})

    # The same mask accepted by someone (a proposal no more) does come in, as accepted.
    data = proposed_coco()
    data["annotations"][4]["segany"]["proposal"] = False  # the deleted one, id 5
    report = import_coco(store, write(tmp_path / "reviewed.json", data), folder)
    assert (report.objects, report.proposals, report.already_imported) == (1, 0, 3)
    (new,) = [o for o in store.objects() if o.id not in first]
    assert (new.image_id, new.source, new.mask) == (1, "manual", deleted.mask)


def test_images_matched_by_name_sizes_checked(client, folder, tmp_path):
    data = proposed_coco()
    data["images"][0]["width"] = 61  # not the file's size: its annotations do not fit
    data["images"][1]["file_name"] = "/elsewhere/photos/sub/b.png"
    data["annotations"].append({"id": 7, "image_id": 99, "category_id": 1, "segmentation": POLYGON})
    report = import_coco(store_of(client), write(tmp_path / "c.json", data), folder)
    skipped = {reason: (s.annotations, s.images) for reason, s in report.skipped.items()}
    assert skipped["image size differs from the file's"] == (3, ["a.png"])
    assert skipped["no image record with their image_id"] == (1, ["99"])
    assert (report.objects, report.proposals) == (1, 1)  # sub/b.png's, found by its tail


def test_image_finder() -> None:
    names = ["a.png", "sub/b.png", "x/c.png", "y/c.png"]
    images = [StoredImage(i, "folder", n, None, None) for i, n in enumerate(names, start=1)]
    images.append(StoredImage(5, "upload", "0123-d.png", None, None))
    finder = ImageFinder(images)

    def ids(name: str) -> list[int]:
        return [image.id for image in finder.find(name)]

    assert ids("a.png") == ids("images/a.png") == ids("./a.png") == [1]
    assert ids("/data/photos/sub/b.png") == ids("sub\\b.png") == ids("b.png") == [2]
    assert ids("other/b.png") == []  # neither name ends with the other
    assert ids("c.png") == [3, 4]  # ambiguous
    assert ids("uploads/0123-d.png") == [5]
    assert ids("missing.png") == []


# -------------------------------------------------------------------------------------
# Bad files and the command line
# -------------------------------------------------------------------------------------


def _with_bad_annotation(segmentation, **fields) -> dict:
    data = proposed_coco()
    data["annotations"].append(
        {"id": 77, "image_id": 11, "category_id": 1, "segmentation": segmentation, **fields}
    )
    return data


BAD_FILES = {
    "missing": (None, "cannot read"),
    "not json": ("{", "cannot read"),
    "not coco": ({"images": {}, "annotations": []}, "not a COCO instances file"),
    "record": ({"images": [{"id": 1}], "annotations": []}, "no 'file_name'"),
    "polygon": (_with_bad_annotation([[1, 2, 3, 4]]), "annotation 77"),
    "runs": (_with_bad_annotation({"size": [30, 50], "counts": [3, 4]}), "annotation 77"),
    "size": (_with_bad_annotation(uncompressed(np.ones((5, 5), bool))), "annotation 77"),
    "string": (_with_bad_annotation({"size": [30, 50], "counts": "0a"}), "annotation 77"),
    # Run lengths pycocotools would trust: past the end of the image, or negative.
    "overlong": (
        _with_bad_annotation({**compressed(np.ones((60, 60), bool)), "size": [30, 50]}),
        "annotation 77",
    ),
    "negative": (_with_bad_annotation({"size": [30, 50], "counts": [1505, -5]}), "annotation 77"),
    # Ids that cannot be looked up (were a TypeError: unhashable type).
    "category id": (
        {**proposed_coco(), "categories": [{"id": [1], "name": "cat"}]},
        "category 0: 'id'",
    ),
    "annotation category": (_with_bad_annotation(POLYGON, category_id={"a": 1}), "annotation 77"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_one_line_errors_and_change_nothing(
    case, client, folder, coco_file, tmp_path, monkeypatch, capsys
) -> None:
    import_coco(store_of(client), coco_file, folder)
    before = store_of(client).objects()
    content, words = BAD_FILES[case]
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))

    def no_model(*args):
        raise AssertionError("the model is loaded only after a good import")

    monkeypatch.setattr(common, "load_model", no_model)
    argv = ["serve", str(folder), "--import-coco", str(path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("segany serve: error:") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    assert store_of(client).objects() == before


def test_non_finite_marks_are_dropped_so_exports_still_work(client, folder, tmp_path):
    """Python's json reads NaN and Infinity; stored, they broke every later export (500)."""
    data = proposed_coco()
    for annotation in data["annotations"]:
        if "segany" in annotation:
            annotation["segany"] = {
                **annotation["segany"],
                "stability_score": math.nan,
                "point_coords": [[math.inf, 3.0]],
            }
    import_coco(store_of(client), write(tmp_path / "nan.json", data), folder)
    exported = client.get("/api/export/coco", params={"include_proposals": "true"})
    assert exported.status_code == 200, exported.text
    marks = [a["segany"] for a in exported.json()["annotations"] if "segany" in a]
    assert len(marks) == 2
    assert all("stability_score" not in mark and "point_coords" not in mark for mark in marks)


def test_cli_imports_then_serves(model, folder, coco_file, monkeypatch, capsys) -> None:
    import uvicorn

    runs = []
    monkeypatch.setattr(common, "load_model", lambda name, checkpoint, device: model)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append(app))
    argv = ["serve", str(folder), "--import-coco", str(coco_file), "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 objects and 2 proposals on 2 images" in out
    assert "image not in the folder" in out and "gone.png" in out
    client = TestClient(runs[0], base_url="http://127.0.0.1:8000")
    sources = [o["source"] for objects in objects_by_image(client).values() for o in objects]
    assert sorted(sources) == ["manual", "manual", "proposal", "proposal"]

    assert cli.main(argv) == 0  # again: nothing new
    assert "0 objects and 0 proposals on 0 images; 4 already imported" in capsys.readouterr().out
    assert len(store_of(TestClient(runs[1])).objects()) == 4

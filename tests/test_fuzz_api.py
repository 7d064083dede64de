"""Property-based fuzzing of ``segany serve``'s web API and COCO import (Hypothesis).

The contract, for any request body, path id and header: a 4xx with a one-line JSON
``detail``, or a valid 2xx (FastAPI checks every answer against its response model);
never a 500 (the TestClient re-raises a server exception, so its traceback is the
failure); and a refused request leaves the store exactly as it was, row for row (no
partial write). The same holds for :func:`import_coco` with any file: a SeganyError and
nothing written, or a report whose counts are what was added.

Bodies are drawn both as arbitrary JSON (NaN and Infinity included, as Python's own
``json`` sends them) and in the shape of each endpoint's body with arbitrary values, so
that the checks behind validation are reached too. One app (the tiny random-weight
model, work budget cut to 16 prompts so that accepted "segment everything" requests stay
quick) serves every example; example counts keep the file to about half a minute.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import randomize_
from test_serve_api import SMALL_CONFIG, blocks, encode, rectangle

from segany.build import build_sam_from_config
from segany.errors import SeganyError
from segany.masks import masks_to_rle
from segany.serve import ServeSettings, create_app, import_coco
from segany.serve.app import EverythingIn, ObjectPatch
from segany.serve.store import ProjectStore

SIZE = (120, 160)  # (height, width) of a.png, the image most bodies aim at
FUZZ = settings(
    max_examples=75,
    deadline=None,  # the model's first calls are slow; time is bounded by the counts
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -------------------------------------------------------------------------------------
# Strategies
# -------------------------------------------------------------------------------------

# Python's json reads and writes NaN and Infinity, so a careless client may send them.
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def usually(good: st.SearchStrategy, bad: st.SearchStrategy = json_values) -> st.SearchStrategy:
    """``good`` seven times in eight, else ``bad``: many bodies get past validation, so the
    checks behind it are fuzzed too."""
    # sampled_from, not integers(0, 7): Hypothesis favours an integer range's ends.
    return st.sampled_from([False] * 7 + [True]).flatmap(lambda junk: bad if junk else good)


coordinates = usually(st.one_of(st.integers(0, 90), st.floats(-5, 170)), numbers)
points_one = usually(st.tuples(coordinates, coordinates))
labels_one = usually(st.sampled_from([0, 1]), numbers)
boxes = usually(st.one_of(st.none(), st.tuples(*[coordinates] * 4)), st.lists(coordinates))


def shaped(
    fields: dict[str, st.SearchStrategy], required: tuple[str, ...] = ()
) -> st.SearchStrategy:
    """A body of the endpoint's shape: the ``required`` fields and any subset of the others,
    each value usually drawn from its strategy, else arbitrary JSON; or, now and then, any
    JSON at all."""
    values = {name: usually(strategy) for name, strategy in fields.items()}
    body = st.fixed_dictionaries(
        {name: values[name] for name in required},
        optional={name: value for name, value in values.items() if name not in required},
    )
    return usually(body)


@st.composite
def prompt_fields(draw, **extra: st.SearchStrategy) -> dict:
    """Points with as many labels (now and then one more or less), maybe a box, and maybe
    each of the ``extra`` fields."""
    count = draw(st.integers(0, 4))
    fields = {
        "points": draw(st.lists(points_one, min_size=count, max_size=count)),
        "labels": draw(st.lists(labels_one, min_size=count, max_size=count)),
    }
    if draw(st.sampled_from([False] * 9 + [True])):
        fields["labels"] = fields["labels"][1:] if count else [1]
    if count == 0 or draw(st.booleans()):
        fields["box"] = draw(boxes)
    for name, strategy in extra.items():
        if draw(st.booleans()):
            fields[name] = draw(usually(strategy))
    return fields


prompts = usually(prompt_fields())
predict_bodies = usually(prompt_fields(multimask=st.booleans()))
# The option names and types come from the API's own model: no second list of them here.
everything_bodies = shaped(
    {
        name: st.integers(-1, 6) if field.annotation is int else st.floats(-0.1, 1.1)
        for name, field in EverythingIn.model_fields.items()
    },
    required=("points_per_side",),
)


@st.composite
def masks(draw) -> dict:
    """A mask that fits a.png (compressed or run lengths), or RLE-shaped junk."""
    height, width = SIZE
    x0, x1 = sorted(draw(st.lists(st.integers(0, width), min_size=2, max_size=2)))
    y0, y1 = sorted(draw(st.lists(st.integers(0, height), min_size=2, max_size=2)))
    mask = rectangle(height, width, x0, y0, x1, y1)
    counts = st.one_of(st.text(max_size=12), st.lists(st.integers(-5, 2**33), max_size=6))
    junk = st.fixed_dictionaries(
        {"size": st.lists(st.integers(-5, 2**40), max_size=3), "counts": counts}
    )
    valid = st.sampled_from([encode(mask), masks_to_rle(torch.from_numpy(mask)[None])[0]])
    return draw(usually(valid, junk))


object_fields = {
    "mask": masks(),
    "label": st.text(max_size=220),
    "source": st.sampled_from(["manual", "auto", "proposal", "other"]),
    "score": st.one_of(st.none(), numbers),
    "prompts": prompts,
}
object_bodies = shaped(object_fields, required=("mask",))
patch_bodies = shaped({name: object_fields[name] for name in ObjectPatch.model_fields})
ids = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1", "2", "0", "-1", "1.5", "1e3", "0x1", " 1", "١", "²"]),
    st.text(max_size=10),
)
# Header values as bytes: HTTP carries latin-1, "²" and friends included.
if_match = st.one_of(
    st.none(),
    st.sampled_from(['"1"', "*", 'W/"2"', "²", '"99999999999999999999"']),
    st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=8),
).map(lambda value: None if value is None else value.encode("latin-1"))

# -------------------------------------------------------------------------------------
# The server and the contract
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> SimpleNamespace:
    """One app for every example: a.png, sub/b.jpg and a saved object on a.png."""
    folder = tmp_path_factory.mktemp("fuzz") / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(blocks(*SIZE, 1)).save(folder / "a.png")
    Image.fromarray(blocks(90, 130, 2)).save(folder / "sub" / "b.jpg")
    torch.manual_seed(0)
    model = randomize_(build_sam_from_config(SMALL_CONFIG), 0).eval()
    config = ServeSettings(
        images_dir=folder,
        project_dir=folder / ".segany",
        max_everything_prompts=16,  # at most 4 x 4 points: accepted runs stay quick
        max_queued_jobs=2,
    )
    client = TestClient(create_app(model, config))
    for image_id in (1, 2):  # the store learns the sizes now, not during an example
        client.get(f"/api/images/{image_id}").raise_for_status()
    made = client.post(
        "/api/images/1/objects", json={"mask": encode(rectangle(*SIZE, 5, 5, 40, 30))}
    )
    assert made.status_code == 201, made.text
    return SimpleNamespace(
        client=client,
        folder=folder,
        store=client.app.state.project.store,
        database=config.project_dir / "project.sqlite",
    )


def snapshot(database: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the store."""
    with sqlite3.connect(database) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            for table in ("images", "objects", "imported")
        }


def request(served: SimpleNamespace, method: str, path: str, body=None, headers=None):
    """Send a request (a body as raw JSON, NaN allowed) and check the contract."""
    before = snapshot(served.database)
    content = None if body is None else json.dumps(body, allow_nan=True)
    headers = {k: v for k, v in (headers or {}).items() if v is not None}
    if content is not None:
        headers["Content-Type"] = "application/json"
    response = served.client.request(method, path, content=content, headers=headers)
    status = response.status_code
    assert status < 500, response.text
    if status >= 400:
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail, detail
        assert snapshot(served.database) == before, f"{method} {path} {status} wrote"
    elif response.headers.get("content-type") == "application/json":
        response.json()
    if status == 202:  # a job: let it finish before the next example reads the store
        served.client.app.state.project.jobs.get(response.json()["id"]).wait(120)
    if method != "GET" and status < 300:
        assert_exportable(served)
    return response


def assert_exportable(served: SimpleNamespace) -> None:
    """What was stored can still be exported (a stored NaN would break every export)."""
    exported = served.client.get("/api/export/coco", params={"include_proposals": "true"})
    assert exported.status_code == 200, exported.text


def object_ids(served: SimpleNamespace) -> list[int]:
    """Ids of the objects there are now (one is made if none is left)."""
    found = [obj.id for obj in served.store.objects()]
    if found:
        return found
    made = served.client.post(
        "/api/images/1/objects", json={"mask": encode(rectangle(*SIZE, 0, 0, 9, 9))}
    )
    return [made.json()["id"]]


# -------------------------------------------------------------------------------------
# Properties
# -------------------------------------------------------------------------------------


@FUZZ
@given(body=predict_bodies, image=st.sampled_from(["1", "2"]))
def test_predict_bodies(served, body, image) -> None:
    response = request(served, "POST", f"/api/images/{image}/predict", body)
    if response.status_code == 200:
        assert len(response.json()["candidates"]) in (1, 3)


@settings(FUZZ, max_examples=40)
@given(body=everything_bodies, path=st.sampled_from(["everything", "everything/jobs"]))
def test_everything_bodies(served, body, path) -> None:
    request(served, "POST", f"/api/images/1/{path}", body)


@FUZZ
@given(body=object_bodies)
def test_new_object_bodies(served, body) -> None:
    response = request(served, "POST", "/api/images/1/objects", body)
    if response.status_code == 201:
        made = response.json()
        assert served.client.get(f"/api/objects/{made['id']}").json() == made


@FUZZ
@given(data=st.data(), body=patch_bodies, etag=if_match)
def test_object_changes(served, data, body, etag) -> None:
    object_id = data.draw(st.sampled_from(object_ids(served)), label="object_id")
    response = request(
        served, "PATCH", f"/api/objects/{object_id}", body, headers={"If-Match": etag}
    )
    if response.status_code == 200:
        assert served.client.get(f"/api/objects/{object_id}").json() == response.json()


@settings(FUZZ, max_examples=150)
@given(
    raw_id=ids,
    route=st.sampled_from(
        [
            ("GET", "/api/images/{}"),
            ("GET", "/api/images/{}/pixels"),
            ("POST", "/api/images/{}/embedding"),
            ("GET", "/api/images/{}/objects"),
            ("POST", "/api/images/{}/proposals/keep"),
            ("GET", "/api/objects/{}"),
            ("DELETE", "/api/objects/{}"),
            ("GET", "/api/jobs/{}"),
            ("DELETE", "/api/jobs/{}"),
        ]
    ),
    etag=if_match,
)
def test_path_ids(served, raw_id, route, etag) -> None:
    method, template = route
    path = template.format(quote(raw_id, safe=""))
    request(served, method, path, headers={"If-Match": etag})


# -------------------------------------------------------------------------------------
# COCO import
# -------------------------------------------------------------------------------------

# Records of the served images, of others and of names that must not be followed.
IMAGE_RECORDS = [
    {"id": 1, "file_name": "a.png", "width": 160, "height": 120},
    {"id": 2, "file_name": "sub/b.jpg"},
    {"id": 3, "file_name": "images/a.png", "width": 80, "height": 60},  # another size
    {"id": "4", "file_name": "x.png"},
    {"id": 5, "file_name": "../a.png"},
    {"id": 6, "file_name": "/etc/passwd"},
]
coco_ids = st.sampled_from([1, 1, 2, 3, "4", 5, 6, 7])
polygons = st.lists(st.lists(coordinates, min_size=6, max_size=8), min_size=1, max_size=2)
annotations = shaped(
    {
        "id": st.integers(1, 9),
        "image_id": coco_ids,
        "category_id": st.integers(1, 3),
        "segmentation": st.one_of(masks(), polygons),
        "iscrowd": st.sampled_from([0, 1]),
        "source": st.sampled_from(["manual", "auto", "proposal"]),
        "segany": shaped({"proposal": st.booleans(), "predicted_iou": numbers}),
    },
    required=("image_id", "segmentation"),
)
image_records = usually(
    st.sampled_from(IMAGE_RECORDS),
    shaped({"id": coco_ids, "file_name": st.text(max_size=10), "width": numbers}),
)
categories = shaped(
    {"id": st.integers(1, 3), "name": st.sampled_from(["cat", "segany_proposal", " "])}
)
coco_files = shaped(
    {
        "images": st.lists(image_records, min_size=1, max_size=3),
        "annotations": st.lists(annotations, min_size=1, max_size=4),
        "categories": st.lists(categories, max_size=3),
    },
    required=("images", "annotations"),
)


@FUZZ
@given(document=coco_files)
def test_coco_import(served, document) -> None:
    path = served.folder.parent / "instances.json"
    path.write_text(json.dumps(document, allow_nan=True))
    store = ProjectStore(served.database)
    before = snapshot(served.database)
    try:
        report = import_coco(store, path, served.folder)
    except SeganyError as error:
        assert str(error) and "\n" not in str(error)
        assert snapshot(served.database) == before
        return
    added = len(snapshot(served.database)["objects"]) - len(before["objects"])
    assert added == report.objects + report.proposals
    assert_exportable(served)

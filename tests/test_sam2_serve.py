"""``segany serve`` with a SAM 2 model, through the HTTP API, against Meta's
``SAM2ImagePredictor`` and ``SAM2AutomaticMaskGenerator`` on the same weights.

The model is Meta's ``sam2.1_hiera_t`` at a 256 px input with random weights (see
tests/sam2_reference.py), so that every test is cheap on a CPU; the full-size model is
proven exact in test_sam2_image.py and test_sam2_predictor.py. The server runs it in fp32,
Meta's numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from reference import randomize_
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2_reference import meta_sam2, photo, segany_sam2
from test_sam2_cli import INPUT_SIZE, assert_same_mask, meta_predictor
from test_serve_api import SMALL_CONFIG, assert_one_line_error, decode, finished_job

from segany import cli
from segany.build import build_sam_from_config
from segany.commands import common
from segany.serve import ServeSettings, create_app

IMAGE = photo(150, 200, seed=4)  # (H, W) = (150, 200): squashed to 256 x 256 by SAM 2
CLICK = {"points": [[60.0, 50.0]], "labels": [1]}
# Random weights predict IoUs near 0.5 and unstable masks, which SAM 2's default
# thresholds (predicted IoU > 0.8, stability >= 0.95) all drop. Shifting the IoU head's
# logits for two of the three multimask outputs (to about 0.84 and 0.95) and sharpening
# the mask logits lets some masks through, one of them only under SAM 2's default
# pred_iou_thresh (0.8), not SAM's (0.88).
IOU_LOGIT_SHIFT = (0.0, 1.44, 3.07, 0.0)  # single-mask output, then the three
MASK_SHARPENING = 10.0
# Meta's SAM2AutomaticMaskGenerator's defaults for what a request may set, by hand.
SAM2_DEFAULTS = {
    "pred_iou_thresh": 0.8,
    "stability_score_thresh": 0.95,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
    "min_mask_region_area": 0,
    "mask_threshold": 0.0,
    "use_m2m": False,
    "multimask_output": True,
}


@pytest.fixture(scope="module")
def meta_model():
    meta = meta_sam2(INPUT_SIZE)
    decoder = meta.sam_mask_decoder
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(MASK_SHARPENING)
            mlp.layers[-1].bias.mul_(MASK_SHARPENING)
        decoder.iou_prediction_head.layers[-1].bias.add_(torch.tensor(IOU_LOGIT_SHIFT))
    return meta


@pytest.fixture(scope="module")
def model(meta_model):
    return segany_sam2(meta_model)


@pytest.fixture(scope="module")
def sam_model():
    """A tiny SAM (not SAM 2) model, as tests/test_serve_api.py serves."""
    torch.manual_seed(0)
    return randomize_(build_sam_from_config(SMALL_CONFIG), 0).eval()


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(IMAGE).save(folder / "a.png")
    return folder


@pytest.fixture
def make_client(model, images_dir):
    """``make_client(served=None, **settings)``: a TestClient on a new fp32 app serving
    ``served`` (the SAM 2 model by default) over ``images_dir``; apps made with the same
    ``project_dir`` share the project (as a restarted server)."""

    def make(served=None, **settings) -> TestClient:
        settings.setdefault("project_dir", images_dir / ".segany")
        settings.setdefault("precision", "fp32")
        app = create_app(served or model, ServeSettings(images_dir=images_dir, **settings))
        return TestClient(app)

    return make


def meta_records(meta_model, **options) -> list[dict]:
    """Meta's generator's records for IMAGE (binary masks), the empty ones left out as the
    server leaves them out."""
    generator = SAM2AutomaticMaskGenerator(meta_model, **options)
    generator.predictor = meta_predictor(meta_model)
    with torch.no_grad():
        return [r for r in generator.generate(IMAGE) if r["area"] > 0]


def assert_metas_proposals(objects: list[dict], records: list[dict]) -> None:
    """The server's proposals are Meta's records: mask, predicted IoU and point (in the
    order of the points, then of descending IoU, so that near-equal IoUs cannot swap)."""
    assert len(objects) == len(records) > 0
    objects = sorted(objects, key=lambda o: (o["prompts"]["points"][0], -o["score"]))
    records = sorted(records, key=lambda r: (r["point_coords"][0], -r["predicted_iou"]))
    for proposal, record in zip(objects, records, strict=True):
        assert proposal["source"] == "proposal"
        assert_same_mask(decode(proposal["mask"]), record["segmentation"])
        assert proposal["score"] == pytest.approx(float(record["predicted_iou"]), abs=1e-4)
        [point] = proposal["prompts"]["points"]
        assert point == pytest.approx(record["point_coords"][0])


def test_clicks_and_boxes_give_metas_masks(make_client, meta_model) -> None:
    client = make_client()
    predictor = meta_predictor(meta_model)
    predictor.set_image(IMAGE)
    box = [20.0, 30.0, 170.0, 120.0]
    cases = [  # (request body, Meta's prompts)
        (CLICK, {"point_coords": np.array(CLICK["points"]), "point_labels": np.array([1])}),
        (
            {"points": [[60.0, 50.0], [150.5, 100.0]], "labels": [1, 0]},
            {"point_coords": np.array([[60.0, 50.0], [150.5, 100.0]]), "point_labels": [1, 0]},
        ),
        ({"box": box, "multimask": False}, {"box": np.array(box), "multimask_output": False}),
        (
            {**CLICK, "box": box},
            {"point_coords": np.array(CLICK["points"]), "point_labels": [1], "box": np.array(box)},
        ),
    ]
    sources = []
    for body, prompts in cases:
        response = client.post("/api/images/1/predict", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        sources.append(answer["embedding"])
        with torch.no_grad():
            masks, scores, _ = predictor.predict(**prompts)
        assert len(answer["candidates"]) == len(masks) == (1 if "multimask" in body else 3)
        for candidate, mask, score in zip(answer["candidates"], masks, scores, strict=True):
            ours = decode(candidate["mask"])
            assert_same_mask(ours, mask > 0)
            assert candidate["area"] == ours.sum()
            assert candidate["score"] == pytest.approx(float(score), abs=1e-4)
        assert answer["best"] == int(np.argmax(scores))
    assert sources == ["computed", "memory", "memory", "memory"]


def test_embedding_is_computed_once_then_kept_in_memory_and_on_disk(
    make_client, model, sam_model, images_dir
) -> None:
    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = make_client()
        assert first.post("/api/images/1/embedding").json()["embedding"] == "computed"
        before = first.post("/api/images/1/predict", json=CLICK).json()
        assert before["embedding"] == "memory"
        assert len(calls) == 1
        restarted = make_client()
        after = restarted.post("/api/images/1/predict", json=CLICK).json()
        assert after["embedding"] == "disk"
        assert len(calls) == 1  # the encoder did not run again
    finally:
        hook.remove()
    assert after["candidates"] == before["candidates"]

    # The disk cache holds the embedding with SAM 2's two high-resolution feature maps.
    cache = images_dir / ".segany" / "embeddings"
    [folder] = cache.iterdir()
    [file] = folder.iterdir()
    saved = torch.load(file, weights_only=True)
    assert tuple(saved["features"].shape) == (1, 256, 16, 16)
    assert [tuple(f.shape) for f in saved["high_res_features"]] == [
        (1, 32, 64, 64),
        (1, 64, 32, 32),
    ]
    # A SAM server on the same project computes its own: the caches never mix.
    sam = make_client(sam_model)
    assert sam.post("/api/images/1/embedding").json()["embedding"] == "computed"
    assert len(list(cache.iterdir())) == 2


def test_everything_runs_sam2s_generator_with_its_defaults(make_client, model, meta_model) -> None:
    client = make_client()
    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        started = client.post("/api/images/1/everything/jobs", json={"points_per_side": 4})
        assert started.status_code == 202, started.text
        done = finished_job(client, started.json()["id"])
        assert done["status"] == "done", done
        assert done["options"] == {"points_per_side": 4, **SAM2_DEFAULTS}
        records = meta_records(meta_model, points_per_side=4)
        assert_metas_proposals(done["objects"], records)
        # SAM's default pred_iou_thresh (0.88) would have dropped one of them.
        assert any(0.8 < r["predicted_iou"] <= 0.88 for r in records)

        # SAM 2's own options, taken by the same request body.
        options = {
            "points_per_side": 4,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
            "box_nms_thresh": 1.0,  # keep every mask: 16 to compare
            "use_m2m": True,
            "multimask_output": False,
            "mask_threshold": 0.5,
        }
        response = client.post("/api/images/1/everything", json=options)
        assert response.status_code == 200, response.text
        records = meta_records(meta_model, **options)
        assert len(records) == 16
        assert_metas_proposals(response.json(), records)
    finally:
        hook.remove()
    assert len(calls) == 1  # both jobs took the image's cached embedding


def test_sam2_options_are_offered_for_sam2_only(make_client, sam_model, images_dir) -> None:
    sam2 = make_client()
    assert sam2.get("/api/info").json()["model_family"] == "sam2"
    schema = sam2.get("/openapi.json").json()["components"]["schemas"]["EverythingIn"]
    defaults = {name: field.get("default") for name, field in schema["properties"].items()}
    assert defaults == {"points_per_side": 32, **SAM2_DEFAULTS}

    sam = make_client(sam_model, project_dir=images_dir / "sam-project")
    assert sam.get("/api/info").json()["model_family"] == "sam"
    schema = sam.get("/openapi.json").json()["components"]["schemas"]["EverythingIn"]
    assert schema["properties"]["pred_iou_thresh"]["default"] == 0.88
    assert not {"use_m2m", "multimask_output", "mask_threshold"} & schema["properties"].keys()
    for path in ("/api/images/1/everything", "/api/images/1/everything/jobs"):
        body = {"points_per_side": 4, "use_m2m": True}
        assert_one_line_error(sam.post(path, json=body), 422, "use_m2m", "SAM 2", "not of SAM's")
        for served in (sam, sam2):  # options the server chooses itself are refused too
            refused = served.post(path, json={"points_per_batch": 8})
            assert_one_line_error(refused, 422, "points_per_batch")
    assert sam.get("/api/jobs").json() == sam2.get("/api/jobs").json() == []


def test_limits_and_bad_input_are_as_for_sam(make_client) -> None:
    client = make_client()
    for options, status, words in (
        ({"points_per_side": 65}, 422, ["points_per_side", "less than or equal to 64"]),
        ({"crop_n_layers": 2}, 422, ["crop_n_layers", "less than or equal to 1"]),
        ({"points_per_side": 64, "crop_n_layers": 1}, 400, ["20480 prompts", "allows 5120"]),
        # 32² points x 5 crops, each point's 3 masks decoded again: 4 x 5,120 prompts.
        ({"crop_n_layers": 1, "use_m2m": True}, 400, ["20480 prompts", "use_m2m"]),
        ({"use_m2m": "yes please"}, 422, ["use_m2m"]),
        ({"mask_threshold": "high"}, 422, ["mask_threshold"]),
    ):
        for path in ("/api/images/1/everything", "/api/images/1/everything/jobs"):
            assert_one_line_error(client.post(path, json=options), status, *words)
    assert client.get("/api/jobs").json() == []
    for body, status, words in (
        ({}, 400, ["at least one point"]),
        ({"points": [[500, 40]], "labels": [1]}, 400, ["outside", "200x150"]),
        ({"points": [[5, 4]], "labels": [1, 0]}, 400, ["1 points but 2 labels"]),
        ({"points": [[5, 4]], "labels": [2]}, 400, ["label 2"]),
        ({"box": [50, 50, 10, 10]}, 400, ["x1 < x0"]),
        ({"box": [1, 2, 3]}, 422, ["box"]),
        ({"box": [10, 10, 30, 30], "zoom": True}, 400, ["zoom works with SAM-family models"]),
    ):
        assert_one_line_error(client.post("/api/images/1/predict", json=body), status, *words)
    assert client.get("/api/info").json()["zoom"] is False
    assert_one_line_error(client.post("/api/images/9/predict", json=CLICK), 404)


def test_cli_serves_a_sam2_model_by_name(model, images_dir, monkeypatch) -> None:
    import uvicorn

    runs = []
    real = common.load_model
    monkeypatch.setattr(
        common, "load_model", lambda name, *args: model if name == "sam2.1_t" else real(name, *args)
    )
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append(app))
    argv = ["serve", str(images_dir), "--model", "sam2.1_t", "--device", "cpu"]
    assert cli.main([*argv, "--precision", "fp32"]) == 0
    [app] = runs
    segmenter = app.state.project.segmenter
    assert segmenter.model is model and segmenter.predictor.precision.name == "fp32"
    info = TestClient(app, base_url="http://127.0.0.1:8000").get("/api/info").json()
    assert (info["model"], info["model_family"]) == ("sam2.1_t", "sam2")

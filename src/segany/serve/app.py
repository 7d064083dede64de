"""The ``segany serve`` web app: an annotation tool over a folder of images.

:func:`create_app` builds a FastAPI app (OpenAPI schema at ``/openapi.json``, docs at
``/docs``) from a model, SAM or SAM 2, and :class:`ServeSettings`. The page at ``/`` is
plain HTML/CSS/JS from ``static/``. The JSON API under ``/api/`` uses, everywhere:

* image and object ids (integers), never paths;
* coordinates in pixels of the original image (x right, y down), boxes XYXY, point
  label 1 = foreground and 0 = background;
* masks as COCO RLE ``{"size": [height, width], "counts": "..."}`` (compressed string, as
  pycocotools writes it; the uncompressed list form is accepted on input);
* errors as ``{"detail": "one line"}``: 400 bad input, 401 no token, 403 a change sent
  by another site's page, 404 unknown id, 409 the job was cancelled, 412 the object
  changed since you read it, 413 body too large, 415 not an image, 422 malformed request
  (an id beyond SQLite's 64-bit integers included), 429 too many jobs waiting.

"Segment everything" is bounded and queued (see :mod:`.limits` and :mod:`.jobs`): it
runs as a job, one at a time, while clicks go on being answered. ``POST
/api/images/{id}/everything/jobs`` starts one and answers at once (202) with its id,
status, queue position and progress; ``GET /api/jobs/{id}`` follows it (its proposals
come with it when done), ``GET /api/jobs`` shows the queue, and ``DELETE /api/jobs/{id}``
cancels it (a running job stops after its current decoder batch and writes nothing).
``POST /api/images/{id}/everything`` does the same and waits for the proposals. Their
options are the served model's family's generator's (SAM's or SAM 2's, with its defaults;
see ``EVERYTHING_IN``); another family's option is refused (422).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError
from starlette.background import BackgroundTask

from .. import __version__
from ..amg_options import AMG_OPTIONS, FAMILY_NAMES
from ..errors import SeganyError
from ..inputs import check_boxes, check_points
from ..masks import check_rle, coco_bbox, coco_to_rle, masks_to_rle, rle_area, rle_to_coco
from ..masks.formats import write_json
from ..modeling import Sam, Sam2
from .export import coco_export, png_zip, write_png_folder
from .jobs import Job, JobCancelled, JobQueue, JobStatus, QueueFull
from .library import ImageLibrary, NotAnImage
from .limits import (
    EVERYTHING_LIMITS,
    EVERYTHING_OPTIONS,
    FINISHED_JOBS_KEPT,
    MAX_CROP_N_LAYERS,
    MAX_EVERYTHING_PROMPTS,
    MAX_ID,
    MAX_POINTS_PER_SIDE,
    MAX_QUEUED_JOBS,
    check_everything_work,
)
from .security import (
    TOKEN_COOKIE,
    BodyLimit,
    HostGuard,
    SameOriginGuard,
    TokenGuard,
    token_matches,
)
from .segmenter import Segmenter
from .store import Conflict, NewObject, NotFound, ProjectStore, StoredImage, StoredObject

STATIC_DIR = Path(__file__).parent / "static"
PROJECT_FILE = "project.sqlite"
JPEG_QUALITY = 92
JOB_POLL_SECONDS = 0.05  # how often a waiting "everything" request looks at its job
SHUTDOWN_WAIT_SECONDS = 30.0  # for the running job to stop (one step) when the server stops


@dataclass(frozen=True)
class ServeSettings:
    """How a server runs.

    Attributes:
        images_dir: the folder whose images are served (recursively), or None for
            uploads only.
        project_dir: where the SQLite store, uploads, cached embeddings and exports go.
        token: required on every API call when set.
        max_upload_bytes: largest request body (uploads); larger ones get 413.
        cache_size: image embeddings kept in memory.
        disk_cache: also keep embeddings in ``project_dir/embeddings``.
        allowed_hosts: accepted ``Host`` headers (guards a loopback server against DNS
            rebinding), or None to accept any.
        model_name: shown in the page.
        max_everything_prompts: decoder prompts one "segment everything" may ask for
            (points_per_side² per crop); more get 400. See :mod:`.limits`.
        max_queued_jobs: jobs that may wait behind the running one; more get 429.
        precision: the model's number format, ``auto``, ``fp32``, ``bf16`` or ``fp16``
            (see :mod:`segany.inference.precision`); ``fp32`` gives the official masks.
    """

    images_dir: Path | None
    project_dir: Path
    token: str | None = None
    max_upload_bytes: int = 50 * 2**20
    cache_size: int = 16
    disk_cache: bool = True
    allowed_hosts: tuple[str, ...] | None = None
    model_name: str = "custom"
    max_everything_prompts: int = MAX_EVERYTHING_PROMPTS
    max_queued_jobs: int = MAX_QUEUED_JOBS
    precision: str = "auto"


class Project:
    """What one server works on: the store, the images and the model."""

    def __init__(self, model: Sam | Sam2, settings: ServeSettings) -> None:
        self.settings = settings
        self.store = ProjectStore(settings.project_dir / PROJECT_FILE)
        self.library = ImageLibrary(self.store, settings.images_dir, settings.project_dir)
        cache = settings.project_dir / "embeddings" if settings.disk_cache else None
        self.segmenter = Segmenter(model, cache, settings.cache_size, settings.precision)
        self.jobs = JobQueue(settings.max_queued_jobs, FINISHED_JOBS_KEPT)
        self.library.scan()


# -------------------------------------------------------------------------------------
# Request and response bodies
# -------------------------------------------------------------------------------------


class Body(BaseModel):
    """A request body's part: its numbers must be finite. JSON has no NaN or Infinity,
    but Python's parser takes them, and a stored one would break every later export."""

    model_config = ConfigDict(allow_inf_nan=False)


class RLE(Body):
    """A mask as COCO RLE, column-major over the image: compressed ``counts`` string, or
    uncompressed run lengths starting with a run of zeros."""

    size: tuple[int, int] = Field(description="[height, width] of the image")
    counts: str | list[int]


class Prompts(Body):
    """Prompts in pixels of the original image."""

    points: list[tuple[float, float]] = Field(
        default_factory=list, max_length=1000, description="(x, y) clicks"
    )
    labels: list[int] = Field(
        default_factory=list, max_length=1000, description="per click: 1 foreground, 0 background"
    )
    box: tuple[float, float, float, float] | None = Field(None, description="x0, y0, x1, y1")


class PredictIn(Prompts):
    multimask: bool = Field(True, description="three candidate masks instead of one")
    zoom: bool = Field(
        False,
        description="segment a small object again on a crop three times its size (SAM-family "
        "models, see /api/info's zoom): sharper masks of small objects, one more image "
        "embedding per object",
    )


class Candidate(BaseModel):
    mask: RLE
    score: float = Field(description="the model's predicted IoU")
    area: int


class PredictOut(BaseModel):
    candidates: list[Candidate]
    best: int = Field(description="index of the candidate with the highest score")
    embedding: Literal["memory", "disk", "computed"]
    decoder_ms: float


class EmbeddingOut(BaseModel):
    embedding: Literal["memory", "disk", "computed"]
    seconds: float


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class EverythingBody(Body):
    """The base of the "segment everything" bodies: a key that is not one of the served
    model's family's options is refused (422), not ignored; another family's option is
    named as such."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    family: ClassVar[str] = "sam"  # the served model's, as AMG_OPTIONS names it

    @model_validator(mode="before")
    @classmethod
    def _refuse_other_familys_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic refuses it
        for name in data:
            # Every name of EVERYTHING_OPTIONS is some family's option.
            if name in EVERYTHING_OPTIONS and name not in cls.model_fields:
                owners = " and ".join(
                    FAMILY_NAMES[family]
                    for family, options in AMG_OPTIONS.items()
                    if name in {spec.name for spec in options.specs()}
                )
                served = FAMILY_NAMES[cls.family]
                raise PydanticCustomError(
                    "other_family",
                    "{name} is an option of {owners}'s mask generator, not of {served}'s "
                    "(this server's model)",
                    {"name": name, "owners": owners, "served": served},
                )
        return data


def _everything_in(family: str) -> type[EverythingBody]:
    """The body of a "segment everything" request to a server of model ``family``, made
    from its generator's options (:data:`~segany.amg_options.AMG_OPTIONS`: types,
    defaults, bounds, descriptions): those in :data:`~.limits.EVERYTHING_OPTIONS`, within
    :data:`~.limits.EVERYTHING_LIMITS`."""
    fields: dict[str, Any] = {}
    for spec in AMG_OPTIONS[family].specs():
        if spec.name not in EVERYTHING_OPTIONS:
            continue
        bounds: dict[str, float | int] = {}
        if spec.minimum is not None:
            bounds["ge"] = _number(spec.minimum)
        if spec.maximum is not None:
            bounds["lt" if spec.below else "le"] = _number(spec.maximum)
        bounds.update(EVERYTHING_LIMITS.get(spec.name, {}))
        fields[spec.name] = (spec.kind, Field(spec.default, description=spec.help, **bounds))
    name = FAMILY_NAMES[family]
    body = create_model(
        "EverythingIn",
        __base__=EverythingBody,
        __doc__=f"Options of {name}'s automatic mask generator ({name}'s defaults), within "
        "the server's limits (see :mod:`segany.serve.limits`).",
        __module__=__name__,
        **fields,
    )
    body.family = family
    return body


# The "segment everything" body of each model family; a server offers its model's.
EVERYTHING_IN: dict[str, type[EverythingBody]] = {
    family: _everything_in(family) for family in AMG_OPTIONS
}
EverythingIn = EVERYTHING_IN["sam"]  # the name it had when the server ran SAM only


class ImageOut(BaseModel):
    id: int
    name: str
    source: Literal["folder", "upload"]
    width: int | None
    height: int | None
    objects: int = Field(0, description="kept objects (manual and auto)")
    proposals: int = 0


class ObjectIn(Body):
    mask: RLE
    label: str = Field("", max_length=200)
    source: Literal["manual", "auto", "proposal"] = "manual"
    score: float | None = None
    prompts: Prompts = Field(default_factory=Prompts)


class ObjectPatch(Body):
    """Fields to change; those left out stay as they are."""

    label: str | None = Field(None, max_length=200)
    source: Literal["manual", "auto", "proposal"] | None = None
    mask: RLE | None = None
    score: float | None = None
    prompts: Prompts | None = None


class ObjectOut(BaseModel):
    id: int
    image_id: int
    label: str
    source: Literal["manual", "auto", "proposal"]
    mask: RLE
    area: int
    bbox: list[float] = Field(description="COCO [x, y, width, height]")
    score: float | None
    prompts: dict[str, Any]
    version: int = Field(description="also the ETag; send it as If-Match to change the object")
    created_at: str
    updated_at: str


class JobOut(BaseModel):
    """A "segment everything" job (see :mod:`segany.serve.jobs`)."""

    id: int
    kind: Literal["everything"]
    image_id: int
    status: JobStatus
    position: int | None = Field(
        description="0 while running, n when n - 1 jobs run before it; null once finished"
    )
    progress: float = Field(description="fraction of the decoder batches done, 0 to 1")
    options: dict[str, Any]
    error: str | None = Field(description="why it failed or was cancelled")
    objects: list[ObjectOut] | None = Field(description="the proposals it stored, once done")
    created_at: str
    started_at: str | None
    finished_at: str | None


class CountOut(BaseModel):
    count: int


class ExportIn(Body):
    format: Literal["coco", "png"] = "coco"
    include_proposals: bool = False


class ExportOut(BaseModel):
    path: str = Field(description="the file or folder written inside the project folder")


# -------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------


def get_project(request: Request) -> Project:
    return request.app.state.project


ProjectDep = Annotated[Project, Depends(get_project)]
# Every id path parameter is 1 to SQLite's largest integer, else 422: a larger one would
# overflow the database driver (a 500), not just name nothing.
ID_RANGE: dict[str, Any] = {"ge": 1, "le": MAX_ID}
ImageId = Annotated[int, PathParam(**ID_RANGE, description="image id from GET /api/images")]
ObjectId = Annotated[int, PathParam(**ID_RANGE, description="object id")]
JobId = Annotated[int, PathParam(**ID_RANGE, description="job id from POST .../everything/jobs")]
IfMatch = Annotated[
    str | None, Header(description="the object's ETag (version); 412 if it changed since")
]


def _image(project: Project, image_id: int) -> StoredImage:
    """The image with its size known (404 for an unknown id or a vanished file)."""
    return project.library.with_size(project.store.image(image_id))


def _object_out(obj: StoredObject, response: Response | None = None) -> ObjectOut:
    if response is not None:
        response.headers["ETag"] = f'"{obj.version}"'
    return ObjectOut(**obj.__dict__)


def _expected_version(if_match: str | None) -> int | None:
    """The version an If-Match header names (``"3"``, ``W/"3"`` or ``3``); None for
    absent or ``*`` (then the last write wins)."""
    if if_match is None or if_match.strip() == "*":
        return None
    text = if_match.strip().removeprefix("W/").strip('"')
    if not (text.isascii() and text.isdigit()):  # int() takes other digits, not "²"
        raise SeganyError(f'If-Match must be an object\'s ETag such as "3", got {if_match!r}')
    return int(text)


def _mask_fields(mask: RLE, image: StoredImage) -> dict[str, Any]:
    """Checked ``mask``, ``area`` and ``bbox`` for the store from a mask sent by a client."""
    raw = mask.model_dump()
    try:
        rle = coco_to_rle(raw) if isinstance(raw["counts"], str) else check_rle(raw)
    except ValueError as error:
        raise SeganyError(f"mask: {error}") from None
    if rle["size"] != [image.height, image.width]:
        raise SeganyError(
            f"mask is {rle['size'][1]}x{rle['size'][0]} but image {image.id} is "
            f"{image.width}x{image.height}"
        )
    area = rle_area(rle)
    if area == 0:
        raise SeganyError("mask is empty; an object needs at least one pixel")
    coco = rle_to_coco(rle)
    return {"mask": coco, "area": area, "bbox": coco_bbox(coco)}


def _prompt_arrays(
    prompts: Prompts, image: StoredImage
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(N, 2) points, (N,) labels and (4,) box, checked against the image before any
    model work (the predictor's own checks, so the messages are the same)."""
    if not prompts.points and not prompts.labels and prompts.box is None:
        raise SeganyError("give at least one point (with its label) or a box")
    if len(prompts.points) != len(prompts.labels):
        raise SeganyError(
            f"{len(prompts.points)} points but {len(prompts.labels)} labels; "
            "give one label per point (1 foreground, 0 background)"
        )
    size = (image.height, image.width)
    points = check_points(prompts.points or None, prompts.labels or None, size)
    box = check_boxes(prompts.box, size)
    return (
        None if points is None else points[0],
        None if points is None else points[1],
        None if box is None else box[0],
    )


def _coco_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(C, H, W) bool masks as compressed COCO RLEs."""
    return [rle_to_coco(rle) for rle in masks_to_rle(torch.from_numpy(masks))]


def _proposal(record: dict[str, Any]) -> NewObject:
    """A stored proposal from an automatic mask generator record."""
    coco = rle_to_coco(record["segmentation"])
    return NewObject(
        mask=coco,
        area=record["area"],
        bbox=coco_bbox(coco),
        source="proposal",
        score=record["predicted_iou"],
        prompts={"points": record["point_coords"], "labels": [1], "box": None},
    )


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")


# -------------------------------------------------------------------------------------
# Routes
# -------------------------------------------------------------------------------------

api = APIRouter(prefix="/api")


@api.get("/info", tags=["project"])
def info(project: ProjectDep) -> dict[str, Any]:
    """Server and project facts the page shows."""
    settings = project.settings
    return {
        "version": __version__,
        "model": settings.model_name,
        "model_family": project.segmenter.family,  # "sam" or "sam2": whose options apply
        "zoom": project.segmenter.family == "sam",  # whether predict takes zoom
        "images_dir": None if settings.images_dir is None else str(settings.images_dir),
        "project_dir": str(settings.project_dir),
        # The limits on one request (see segany.serve.limits).
        "max_upload_bytes": settings.max_upload_bytes,
        "max_points_per_side": MAX_POINTS_PER_SIDE,
        "max_crop_n_layers": MAX_CROP_N_LAYERS,
        "max_everything_prompts": settings.max_everything_prompts,
        "max_queued_jobs": settings.max_queued_jobs,
    }


def _image_out(project: Project, image: StoredImage, counts: dict | None = None) -> ImageOut:
    """The image with its object counts (looked up unless given)."""
    if counts is None:
        counts = project.store.object_counts(image.id).get(image.id, {})
    return ImageOut(
        **image.__dict__,
        objects=counts.get("manual", 0) + counts.get("auto", 0),
        proposals=counts.get("proposal", 0),
    )


@api.get("/images", tags=["images"])
def list_images(project: ProjectDep) -> list[ImageOut]:
    """All images (folder files by name, then uploads), with object counts. Rescans the
    folder, so files added since start appear."""
    project.library.scan()
    counts = project.store.object_counts()
    images = project.store.images()
    return [_image_out(project, image, counts.get(image.id, {})) for image in images]


@api.post("/images", status_code=201, tags=["images"])
def upload_image(project: ProjectDep, file: UploadFile) -> ImageOut:
    """Add an uploaded picture (multipart field ``file``); 415 if it is not an image,
    413 if larger than the limit. The same file uploaded twice is one image."""
    image = project.library.add_upload(file.filename or "image", file.file.read())
    return _image_out(project, image)


@api.get("/images/{image_id}", tags=["images"])
def get_image(project: ProjectDep, image_id: ImageId) -> ImageOut:
    """One image, with its size and object counts."""
    return _image_out(project, _image(project, image_id))


@api.get("/images/{image_id}/pixels", tags=["images"], response_class=Response)
def image_pixels(project: ProjectDep, image_id: ImageId, request: Request) -> Response:
    """The image as JPEG, upright and RGB exactly as the model sees it (so masks line up
    pixel for pixel), whatever the file's format."""
    image = project.store.image(image_id)
    etag = f'"{project.library.content_key(image)}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    buffer = io.BytesIO()
    Image.fromarray(project.library.pixels(image)).save(
        buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    return Response(buffer.getvalue(), media_type="image/jpeg", headers=headers)


@api.post("/images/{image_id}/embedding", tags=["segmentation"])
def embed_image(project: ProjectDep, image_id: ImageId) -> EmbeddingOut:
    """Compute (or find cached) the image's embedding, so the next click is fast."""
    image = project.store.image(image_id)
    start = time.perf_counter()
    source = project.segmenter.embed(
        project.library.content_key(image), lambda: project.library.pixels(image)
    )
    return EmbeddingOut(embedding=source, seconds=time.perf_counter() - start)


@api.post("/images/{image_id}/predict", tags=["segmentation"])
def predict(project: ProjectDep, image_id: ImageId, body: PredictIn) -> PredictOut:
    """Candidate masks for clicks and/or a box (``SamPredictor.predict``); nothing is
    stored. Save the chosen one with POST /api/images/{id}/objects."""
    image = _image(project, image_id)
    points, labels, box = _prompt_arrays(body, image)
    masks, scores, source, seconds = project.segmenter.predict(
        project.library.content_key(image),
        lambda: project.library.pixels(image),
        points,
        labels,
        box,
        body.multimask,
        body.zoom,
    )
    candidates = [
        Candidate(mask=RLE(**rle), score=float(score), area=int(mask.sum()))
        for rle, score, mask in zip(_coco_masks(masks), scores, masks, strict=True)
    ]
    return PredictOut(
        candidates=candidates,
        best=int(np.argmax(scores)),
        embedding=source,
        decoder_ms=seconds * 1000,
    )


def _submit_everything(project: Project, image_id: int, body: EverythingBody | None) -> Job:
    """Queue "segment everything" on an image after checking the request's work against
    the server's budget (400) and the image's id (404)."""
    options = (body or EVERYTHING_IN[project.segmenter.family]()).model_dump()
    check_everything_work(options, project.settings.max_everything_prompts)
    image = project.store.image(image_id)

    def work(job: Job) -> list[StoredObject]:
        records = project.segmenter.everything(
            project.library.content_key(image),
            lambda: project.library.pixels(image),
            options,
            job.progress,
        )
        proposals = [_proposal(record) for record in records if record["area"] > 0]
        job.check()  # the last moment to cancel: nothing is written yet
        return project.store.create_objects(image_id, proposals, replace_proposals=True)

    return project.jobs.submit("everything", image_id, options, work)


def _job_out(project: Project, job: Job) -> JobOut:
    progress = job.steps_done / job.steps_total if job.steps_total else 0.0
    objects = job.result if job.status == "done" else None
    return JobOut(
        id=job.id,
        kind="everything",
        image_id=job.image_id,
        status=job.status,
        position=project.jobs.position(job),
        progress=1.0 if job.status == "done" else progress,
        options=job.options,
        error=None if job.error is None else str(job.error),
        objects=None if objects is None else [_object_out(obj) for obj in objects],
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _everything_routes(body_type: type[EverythingBody]) -> APIRouter:
    """The two routes that start "segment everything", with the served model's family's
    options (``body_type``, from :data:`EVERYTHING_IN`) as their body."""

    async def segment_everything(
        project: ProjectDep,
        image_id: ImageId,
        request: Request,
        body: EverythingBody | None = None,
    ) -> list[ObjectOut]:
        """Run the automatic mask generator; its masks replace the image's earlier
        proposals (source ``proposal``) and are returned. Keep or delete them afterwards.

        Runs as a job (see POST /api/images/{id}/everything/jobs) and waits for it: 409 if
        it is cancelled, and closing the connection cancels it."""
        job = _submit_everything(project, image_id, body)
        # Wait on the event loop, not in a worker thread, so a dropped client is noticed.
        while not job.finished:
            if await request.is_disconnected():
                project.jobs.cancel(job.id)
            await asyncio.sleep(JOB_POLL_SECONDS)
        if job.error is not None:
            raise job.error
        return [_object_out(obj) for obj in job.result]

    def start_everything(
        project: ProjectDep,
        image_id: ImageId,
        response: Response,
        body: EverythingBody | None = None,
    ) -> JobOut:
        """Queue "segment everything" and answer at once with the job (status, position in
        the queue, progress). Follow it with GET /api/jobs/{id}; 429 if the queue is full."""
        job = _submit_everything(project, image_id, body)
        response.headers["Location"] = f"/api/jobs/{job.id}"
        return _job_out(project, job)

    router = APIRouter(prefix="/api")
    for endpoint in (segment_everything, start_everything):
        # FastAPI reads the body's type from the annotation, which names the base class
        # (annotations are strings resolved in this module): the family's comes in here.
        endpoint.__annotations__["body"] = body_type | None
    router.add_api_route(
        "/images/{image_id}/everything",
        segment_everything,
        methods=["POST"],
        tags=["segmentation"],
    )
    router.add_api_route(
        "/images/{image_id}/everything/jobs",
        start_everything,
        methods=["POST"],
        status_code=202,
        tags=["jobs"],
    )
    return router


@api.get("/jobs", tags=["jobs"])
def list_jobs(project: ProjectDep) -> list[JobOut]:
    """The queue: the running job, the waiting ones in order, then recently finished ones."""
    return [_job_out(project, job) for job in project.jobs.jobs()]


@api.get("/jobs/{job_id}", tags=["jobs"])
def get_job(project: ProjectDep, job_id: JobId) -> JobOut:
    """A job's status, queue position and progress; its proposals once done."""
    return _job_out(project, project.jobs.get(job_id))


@api.delete("/jobs/{job_id}", tags=["jobs"])
def cancel_job(project: ProjectDep, job_id: JobId) -> JobOut:
    """Cancel a job: a waiting one at once (``cancelled``), the running one after its
    current decoder batch (``cancelling``, then ``cancelled``); a cancelled job writes no
    proposals. A finished job is returned as it is."""
    return _job_out(project, project.jobs.cancel(job_id))


@api.get("/images/{image_id}/objects", tags=["objects"])
def list_objects(project: ProjectDep, image_id: ImageId) -> list[ObjectOut]:
    """The image's objects, oldest first (proposals included)."""
    project.store.image(image_id)  # 404 for an unknown image
    return [_object_out(obj) for obj in project.store.objects(image_id)]


@api.post("/images/{image_id}/objects", status_code=201, tags=["objects"])
def create_object(
    project: ProjectDep, image_id: ImageId, body: ObjectIn, response: Response
) -> ObjectOut:
    """Save an object: its mask (the image's size, not empty), label, score and prompts."""
    image = _image(project, image_id)
    new = NewObject(
        **_mask_fields(body.mask, image),
        label=body.label.strip(),
        source=body.source,
        score=body.score,
        prompts=body.prompts.model_dump(),
    )
    (stored,) = project.store.create_objects(image_id, [new])
    return _object_out(stored, response)


@api.post("/images/{image_id}/proposals/keep", tags=["objects"])
def keep_proposals(project: ProjectDep, image_id: ImageId) -> CountOut:
    """Keep all of the image's proposals (they become source ``auto``)."""
    project.store.image(image_id)
    return CountOut(count=project.store.keep_proposals(image_id))


@api.delete("/images/{image_id}/proposals", tags=["objects"])
def delete_proposals(project: ProjectDep, image_id: ImageId) -> CountOut:
    """Delete all of the image's proposals."""
    project.store.image(image_id)
    return CountOut(count=project.store.delete_proposals(image_id))


@api.get("/objects/{object_id}", tags=["objects"])
def get_object(project: ProjectDep, object_id: ObjectId, response: Response) -> ObjectOut:
    return _object_out(project.store.object(object_id), response)


@api.patch("/objects/{object_id}", tags=["objects"])
def update_object(
    project: ProjectDep,
    object_id: ObjectId,
    body: ObjectPatch,
    response: Response,
    if_match: IfMatch = None,
) -> ObjectOut:
    """Change an object's label, source, mask, score or prompts. With ``If-Match`` (its
    ETag) the change applies only if nobody changed it since (else 412); without, the
    last write wins. Either way the whole change applies or none of it."""
    expected = _expected_version(if_match)
    changes = body.model_dump(exclude_unset=True)
    if "label" in changes:
        changes["label"] = (changes["label"] or "").strip()
    if body.mask is not None:
        image = _image(project, project.store.object(object_id).image_id)
        changes.update(_mask_fields(body.mask, image))
    for required in ("source", "mask"):  # an object always has these: null changes nothing
        if changes.get(required) is None:
            changes.pop(required, None)
    stored = project.store.update_object(object_id, changes, expected)
    return _object_out(stored, response)


@api.delete("/objects/{object_id}", status_code=204, tags=["objects"])
def delete_object(project: ProjectDep, object_id: ObjectId, if_match: IfMatch = None) -> Response:
    """Delete an object (412 if ``If-Match`` is given and it changed since)."""
    project.store.delete_object(object_id, _expected_version(if_match))
    return Response(status_code=204)


@api.get("/export/coco", tags=["export"])
def export_coco(project: ProjectDep, include_proposals: bool = False) -> JSONResponse:
    """COCO instances JSON of the kept objects (RLE masks; a category per label),
    downloaded as ``segany-coco.json``."""
    return JSONResponse(
        coco_export(project.store, include_proposals),
        headers={"Content-Disposition": 'attachment; filename="segany-coco.json"'},
    )


@api.get("/export/masks.zip", tags=["export"], response_class=FileResponse)
def export_masks_zip(project: ProjectDep, include_proposals: bool = False) -> FileResponse:
    """A zip of one 0/255 PNG per kept object plus ``objects.csv``."""
    work = Path(tempfile.mkdtemp(prefix="segany-export-"))
    archive = png_zip(project.store, work, include_proposals)
    return FileResponse(
        archive,
        media_type="application/zip",
        filename="segany-masks.zip",
        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
    )


@api.post("/export", tags=["export"])
def export_to_folder(project: ProjectDep, body: ExportIn) -> ExportOut:
    """Write an export into ``PROJECT/exports/`` on the server (for large projects)."""
    exports = project.settings.project_dir / "exports"
    if body.format == "coco":
        path = write_json(
            exports / f"{_timestamp()}-coco.json",
            coco_export(project.store, body.include_proposals),
        )
    else:
        path = write_png_folder(
            project.store, exports / f"{_timestamp()}-masks", body.include_proposals
        )
    return ExportOut(path=str(path))


# -------------------------------------------------------------------------------------
# The app
# -------------------------------------------------------------------------------------


def _error_handler(status: int):
    async def handle(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status)

    return handle


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's list of problems as one line: ``where: what; where: what``."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ())[1:])
        parts.append(f"{where}: {problem.get('msg', 'invalid')}" if where else problem["msg"])
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


def _index(request: Request, token: str | None = None) -> Response:
    """The page; ``/?token=T`` with the right token stores it in a cookie and drops it from
    the address (so it is not left in the history)."""
    wanted = request.app.state.project.settings.token
    if token is not None and wanted is not None and token_matches(token, wanted):
        response: Response = RedirectResponse("/", status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """On shutdown, cancel the jobs and let the running one stop between two batches."""
    yield
    jobs = app.state.project.jobs
    await anyio.to_thread.run_sync(jobs.shutdown, SHUTDOWN_WAIT_SECONDS)


def create_app(model: Sam | Sam2, settings: ServeSettings) -> FastAPI:
    """The web app for ``model`` (SAM or SAM 2) and ``settings`` (opens or creates the
    project)."""
    app = FastAPI(
        title="segany serve",
        version=__version__,
        description=__doc__,
        lifespan=_lifespan,
    )
    app.state.project = project = Project(model, settings)
    app.include_router(api)
    app.include_router(_everything_routes(EVERYTHING_IN[project.segmenter.family]))
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for error_type, status in (
        (NotFound, 404),
        (Conflict, 412),
        (JobCancelled, 409),
        (QueueFull, 429),
        (NotAnImage, 415),
        (SeganyError, 400),
    ):
        app.add_exception_handler(error_type, _error_handler(status))
    app.add_exception_handler(RequestValidationError, _validation_error)
    # The last added middleware runs first: host, token, origin, then body size.
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(SameOriginGuard)
    if settings.token:
        app.add_middleware(TokenGuard, token=settings.token)
    if settings.allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed=settings.allowed_hosts)
    return app

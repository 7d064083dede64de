"""The bounds on what one request may ask of ``segany serve``, defined once here.

Ids: SQLite stores integers in 64 bits, so an id above :data:`MAX_ID` names nothing and
must be refused before it reaches the database (where Python's ``sqlite3`` would raise
OverflowError instead of finding no row).

Segment everything: its cost is one mask-decoder pass per prompt point and one
image-encoder pass per crop (the full image's is usually cached). With the default 32
points per side (SAM's and SAM 2's) that is 1,024 prompts; every crop layer multiplies the
crops by 4 and each crop has its own points_per_side² grid; SAM 2's ``use_m2m`` decodes
each of a point's masks (3, or 1 without ``multimask_output``) once more, with the mask as
a prompt. The caps below keep one request to minutes of CPU at the very worst, for either
family:

* ``points_per_side <= 64`` (4,096 prompts without crops): 4x the default, which is
  already dense enough for the small objects of a 1,024-pixel input.
* ``crop_n_layers <= 1`` (the image plus 4 crops, so at most 4 encoder passes): a second
  layer adds 16 more encoder passes, each seconds to tens of seconds of CPU with ViT-H.
* a budget of :data:`MAX_EVERYTHING_PROMPTS` prompts in all, so that both caps at once
  (64² x 5 crops = 20,480 prompts) are refused while SAM's ``crop_n_layers=1`` recipe at
  32 points per side (5,120) is allowed. The budget is a :class:`~.app.ServeSettings`
  field, so a server on a GPU may raise it.

A request sets only the generator's options in :data:`EVERYTHING_OPTIONS` that the served
model's family has (the server chooses the decoder batch and the output mode, and keeps the
crop layers' downscale factor at 1, which :func:`everything_prompts` counts on), within
their own bounds (see :class:`segany.amg_options.AmgOptions` and its SAM 2 subclass) and
:data:`EVERYTHING_LIMITS`.

Jobs: "segment everything" runs as a job, one at a time; at most
:data:`MAX_QUEUED_JOBS` wait behind the running one (more get 429), so a client cannot
queue unbounded work either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import SeganyError

MAX_ID = 2**63 - 1  # SQLite's largest INTEGER
MAX_POINTS_PER_SIDE = 64
MAX_CROP_N_LAYERS = 1
MAX_EVERYTHING_PROMPTS = 32 * 32 * 5
MAX_QUEUED_JOBS = 8
FINISHED_JOBS_KEPT = 32  # finished jobs still answered by GET /api/jobs/{id}

# The generators' options a "segment everything" request may set (those of the served
# model's family: the last three are SAM 2's), and the server's bounds on them beyond the
# generator's own (pydantic Field constraints).
EVERYTHING_OPTIONS = (
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "box_nms_thresh",
    "crop_n_layers",
    "min_mask_region_area",
    "mask_threshold",
    "use_m2m",
    "multimask_output",
)
EVERYTHING_LIMITS: dict[str, dict[str, int]] = {
    "points_per_side": {"le": MAX_POINTS_PER_SIDE},
    "crop_n_layers": {"le": MAX_CROP_N_LAYERS},
}


def everything_prompts(points_per_side: int, crop_n_layers: int, refined: int = 0) -> int:
    """Decoder prompts of one "segment everything": points_per_side² in each crop, and
    crop layer i has (2**i)² crops (the server keeps the generator's downscale factor 1);
    each point's ``refined`` masks are decoded once more (SAM 2's ``use_m2m``)."""
    crops = sum(4**layer for layer in range(crop_n_layers + 1))
    return points_per_side**2 * crops * (1 + refined)


def check_everything_work(options: Mapping[str, Any], budget: int) -> None:
    """SeganyError (one line) when a request's generator ``options`` ask for more
    prompts than ``budget``."""
    points, layers = options["points_per_side"], options["crop_n_layers"]
    refined = 0
    if options.get("use_m2m", False):  # SAM 2's: its decoder gives 3 masks, or 1
        refined = 3 if options.get("multimask_output", True) else 1
    prompts = everything_prompts(points, layers, refined)
    if prompts > budget:
        m2m = f" and use_m2m ({refined} refined masks per point)" if refined else ""
        raise SeganyError(
            f"points_per_side={points} with crop_n_layers={layers}{m2m} asks for "
            f"{prompts} prompts; this server allows {budget} per request: use fewer points "
            "per side or fewer crop layers" + (", or no use_m2m" if refined else "")
        )

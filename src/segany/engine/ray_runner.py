"""Annotating images with Ray Data: a pool of workers, each loading the model once.

The images flow through ``Dataset.map_batches`` with an actor class (:class:`RayAnnotator`)
in a pool of ``workers`` actors, one GPU each when the cluster has GPUs. Results stream
back to the driver as they finish, in any order, so the driver can write each image's
output at once. Fault tolerance is Ray Data's: a worker process that dies is restarted
and the images it held are run again (actor restarts and task retries, which Ray Data
enables by default for actor pools and which ``tests/test_engine.py`` checks by killing a
worker); a rerun of the command skips what was written.

Where images are read: on a local Ray (no address) the workers read the files
themselves. On a cluster the driver reads each file and ships its bytes through Ray's
object store (spilled to disk when large), so workers need no access to the driver's
files; with ``ship_bytes=False`` (``--shared-storage``) the workers read the paths
instead (every node must see the files at the same paths), which avoids reading
everything up front.

Ray is imported only here, and only when a run uses it.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import SeganyError
from .annotate import Annotator, ModelSpec, Result, Task, one_line

INSTALL_HINT = "pip install 'segany[engine]'"
# Images per from_items call when the driver ships bytes: bounds the driver's own memory.
SHIP_CHUNK = 256
# One image per block keeps a killed worker's lost work to the images it held, up to this.
MAX_BLOCKS = 10_000
# CPUs per worker without GPUs. Small models get one single-threaded worker per CPU: no
# threads waiting on each other, which is slow on a busy machine (see docs/data-engine.md); SAM's
# ViT models take several GB each, so they get fewer, multi-threaded workers.
CPUS_PER_SMALL_WORKER = 1
CPUS_PER_LARGE_WORKER = 4
LARGE_MODELS = ("vit_b", "vit_l", "vit_h")
LARGE_CHECKPOINT_BYTES = 200 * 2**20
CONNECT_TIMEOUT_S = 10.0
RESULT_FIELDS = tuple(f.name for f in fields(Result))


def import_ray() -> ModuleType | None:
    """The ``ray`` module with Ray Data, or None when it is not installed."""
    try:
        import ray
        import ray.data  # the part of Ray the engine needs
    except ImportError:
        return None
    return ray


def require_ray() -> ModuleType:
    ray = import_ray()
    if ray is None:
        raise SeganyError(f"--ray-address needs Ray, which is not installed: {INSTALL_HINT}")
    return ray


def _check_reachable(address: str) -> None:
    """A quick TCP check of ``host:port`` (or ``ray://host:port``), so that a wrong address
    fails in seconds with a clear message instead of Ray's long connection retries."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SeganyError(
            f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto "
            "(the head node's address, as `ray start --head` prints it)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SeganyError(
            f"cannot reach the Ray cluster at {address} ({reason}); start it with "
            "`ray start --head` on the head node, or check the address and firewall"
        ) from None


def connect(ray: ModuleType, address: str | None) -> bool:
    """Connect to the cluster at ``address``, or start a local Ray when None (unless this
    process is connected already). Returns whether this call connected (then the caller
    disconnects with ``ray.shutdown()`` when done)."""
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise SeganyError(f"cannot connect to {where}: {one_line(error)}") from None
    return True


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, and the resources each one reserves."""

    workers: int
    cpus: float
    gpus: int

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def cpus_per_worker(spec: ModelSpec) -> int:
    """CPUs a worker of ``spec``'s model gets by default (see :data:`LARGE_MODELS`)."""
    large = spec.model in LARGE_MODELS
    if spec.checkpoint is not None and Path(spec.checkpoint).is_file():
        large = large or Path(spec.checkpoint).stat().st_size > LARGE_CHECKPOINT_BYTES
    return CPUS_PER_LARGE_WORKER if large else CPUS_PER_SMALL_WORKER


def plan_workers(resources: dict[str, float], workers: int | None, cpus_each: int) -> WorkerPlan:
    """Workers for a cluster with ``resources`` (``ray.cluster_resources()``): a GPU each
    when there are GPUs (by default as many workers as GPUs), else an equal share of the
    CPUs (by default a worker per ``cpus_each`` CPUs)."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus > 0:
        return WorkerPlan(workers or gpus, 1.0, 1)
    count = workers or max(1, int(cpus // cpus_each))
    # Never ask for more CPUs than the cluster has, or the pool would wait forever.
    share = max(1, math.floor(cpus / count)) if cpus >= count else cpus / count
    return WorkerPlan(count, share, 0)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"segany: warning: {message}", file=sys.stderr)


class RayAnnotator:
    """The actor of the pool: an :class:`Annotator` per worker process, for
    ``map_batches`` batches with columns ``path``, ``image_id`` and optionally ``data``."""

    def __init__(self, spec: dict[str, Any], threads: int, show_warnings: bool) -> None:
        import torch

        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            if show_warnings:  # one line each, as the CLI shows them
                warnings.showwarning = _one_line_warning
            else:  # the driver has loaded the same model and shown them already
                warnings.simplefilter("ignore")
            self.annotator = Annotator(ModelSpec.from_dict(spec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        data = batch.get("data")
        results = [
            self.annotator(Task(str(path), int(image_id), None if data is None else bytes(data[i])))
            for i, (path, image_id) in enumerate(zip(batch["path"], batch["image_id"]))
        ]
        return {name: [getattr(r, name) for r in results] for name in RESULT_FIELDS}


def _read_bytes(tasks: Sequence[Task]) -> tuple[list[dict[str, Any]], list[Result]]:
    """Rows with each file's bytes, and failed Results for files the driver cannot read."""
    rows, failed = [], []
    for task in tasks:
        try:
            with open(task.path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            reason = f"cannot read image {task.path}: {error.strerror or error}"
            failed.append(Result(task.path, error=reason))
            continue
        rows.append({"path": task.path, "image_id": task.image_id, "data": data})
    return rows, failed


def _dataset(ray: ModuleType, tasks: Sequence[Task], ship_bytes: bool) -> tuple[Any, list[Result]]:
    """The input dataset of ``tasks`` and the failures found while building it."""
    if not ship_bytes:
        rows = [{"path": t.path, "image_id": t.image_id} for t in tasks]
        blocks = min(len(rows), MAX_BLOCKS)
        return ray.data.from_items(rows, override_num_blocks=blocks), []
    parts, failed = [], []
    for start in range(0, len(tasks), SHIP_CHUNK):
        rows, unread = _read_bytes(tasks[start : start + SHIP_CHUNK])
        failed += unread
        if rows:  # from_items puts the rows in the object store; the list can go
            parts.append(ray.data.from_items(rows, override_num_blocks=len(rows)))
    if not parts:
        return None, failed
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), failed


def _quiet_data_context(ray: ModuleType) -> None:
    """No Ray Data progress bars (the engine shows its own), no notice about that, and
    only warnings and errors from Ray Data's log (its full log stays in the session logs)."""
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # marks the notice as already shown
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_on_ray(
    ray: ModuleType,
    tasks: Sequence[Task],
    spec: ModelSpec,
    plan: WorkerPlan,
    ship_bytes: bool,
    show_warnings: bool = True,
) -> Iterator[Result]:
    """Annotate ``tasks`` on the connected Ray cluster; Results in completion order.

    ``show_warnings``: whether workers print the warnings of loading the model (once each).

    Tasks are given with absolute paths. Images the driver cannot read (when shipping
    bytes) come first as failed Results.
    """
    _quiet_data_context(ray)
    dataset, failed = _dataset(ray, tasks, ship_bytes)
    yield from failed
    if dataset is None:
        return
    annotated = dataset.map_batches(
        RayAnnotator,
        fn_constructor_kwargs={
            "spec": spec.to_dict(),
            "threads": plan.threads,
            "show_warnings": show_warnings,
        },
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        batch_size=1,
        num_cpus=plan.cpus,
        num_gpus=plan.gpus or None,
    )
    for row in annotated.iter_rows():
        yield Result(
            path=str(row["path"]),
            document=str(row["document"]),
            error=str(row["error"]),
            masks=int(row["masks"]),
            seconds=float(row["seconds"]),
            worker=int(row["worker"]),
        )

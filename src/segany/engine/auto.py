"""The fully automatic stage: every image of a collection to an SA-1B-style JSON file.

The driver (this module) plans the run, hands the unfinished images to a runner (Ray, or
this process) and writes each result as it arrives:

* ``OUTDIR/STEM.json`` per image, written atomically the moment its result arrives, so a
  killed run keeps every finished image and a rerun does only the others;
* ``OUTDIR/failures.jsonl``, one ``{"path", "reason"}`` line per image that could not be
  annotated (unreadable file, ...); those images are skipped, and tried again by a rerun;
* ``OUTDIR/summary.json``, the run's numbers (also when interrupted), as :class:`Summary`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm import tqdm

from ..atomic import write_text_atomic
from ..errors import SeganyError
from ..loading import load_model
from .annotate import ModelSpec, Result, Task
from .local_runner import run_in_process
from .ray_runner import (
    connect,
    cpus_per_worker,
    import_ray,
    plan_workers,
    require_ray,
    run_on_ray,
)
from .sources import Job, plan_jobs

SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.jsonl"
# Failures are rewritten at most this often (and at the end): many unreadable files must
# not make the run quadratic, and a lost failure line only means that image is retried.
FAILURES_SAVE_S = 2.0


@dataclass(frozen=True)
class RunSettings:
    """Where the work runs.

    Attributes:
        use_ray: False runs in this process; True uses Ray (a local one unless
            ``address``), which must then be installed.
        address: a Ray cluster's address (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``).
        workers: Ray workers (default: one per GPU, else one per CPU, or per 4 CPUs for
            SAM's ViT models).
        read_on_workers: workers read the image files themselves (needs the files at the
            same paths on every node); default: yes on a local Ray, no on a cluster, where
            the driver ships the bytes.
    """

    use_ray: bool = True
    address: str | None = None
    workers: int | None = None
    read_on_workers: bool | None = None


def resolve_ray(settings: RunSettings) -> ModuleType | None:
    """The ray module if the run uses Ray, None to run in this process.

    SeganyError when a cluster address is given but Ray is not installed; without an
    address a missing Ray means running in this process.
    """
    if settings.address is not None:
        return require_ray()
    return import_ray() if settings.use_ray else None


@dataclass
class Summary:
    """The numbers of one run (``summary.json``)."""

    images: int
    done_this_run: int = 0
    done_total: int = 0
    skipped_already_done: int = 0
    failed: int = 0
    masks: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    runner: str = "in-process"
    workers: int = 1
    interrupted: bool = False
    finished_at: str = ""

    def line(self, outdir: Path) -> str:
        state = "interrupted: " if self.interrupted else ""
        return (
            f"{state}{self.images} image(s): {self.done_this_run} annotated this run "
            f"({self.masks} masks), {self.skipped_already_done} already done, "
            f"{self.failed} failed; {self.done_total} done in total; {self.seconds:.1f} s, "
            f"{self.images_per_s:.3g} images/s ({self.runner}, {self.workers} worker(s)); "
            f"output in {outdir}"
        )


class FailureLog:
    """``failures.jsonl``: the images not annotated and why, kept across runs until they
    succeed (entries of images that are not retried this run are kept as they were)."""

    def __init__(self, path: Path, jobs: Sequence[Job]) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self._saved = time.monotonic()
        self._dirty = False
        unfinished = {str(job.path.resolve()) for job in jobs if not job.done()}
        lines = self._lines()
        for line in lines:
            if line.get("path") in unfinished:
                self.entries[line["path"]] = str(line.get("reason", ""))
        self._dirty = len(self.entries) != len(lines)  # drop lines of finished images

    def _lines(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = []
        for text in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                continue  # an old, damaged line: the image is retried anyway
            if isinstance(entry, dict):
                lines.append(entry)
        return lines

    def set(self, path: str, reason: str | None) -> None:
        """Record ``path`` as failed with ``reason``, or as fine when ``reason`` is None."""
        before = self.entries.get(path)
        if reason is None:
            self.entries.pop(path, None)
        else:
            self.entries[path] = reason
        self._dirty |= before != reason
        if self._dirty and time.monotonic() - self._saved > FAILURES_SAVE_S:
            self.save()

    def save(self) -> None:
        if not self._dirty:
            return
        if self.entries:
            lines = (json.dumps({"path": p, "reason": r}) for p, r in self.entries.items())
            write_text_atomic(self.path, "".join(line + "\n" for line in lines))
        else:
            self.path.unlink(missing_ok=True)
        self._saved, self._dirty = time.monotonic(), False


def plan_auto(paths: list[Path], outdir: Path) -> list[Job]:
    """A Job per image, writing ``OUTDIR/STEM.json``; SeganyError on clashing names."""
    jobs = plan_jobs(paths, lambda stem: outdir / f"{stem}.json")
    for job in jobs:
        if job.main_output.name == SUMMARY_FILE:
            raise SeganyError(
                f"{job.path} would be written to {job.main_output}, the run's summary file; "
                "rename the image"
            )
    return jobs


def _local_weights(spec: ModelSpec) -> ModelSpec:
    """``spec`` with official weights downloaded once, here, before workers start (so that
    local workers do not all download them at the same time)."""
    if spec.checkpoint is not None:
        return spec
    from ..loading import official_weights_for
    from ..weights import download

    official = official_weights_for(spec.model or "default")
    if official is None:
        return spec
    return replace(spec, checkpoint=str(download(official.name)))


def _results(
    tasks: list[Task], spec: ModelSpec, settings: RunSettings, ray: ModuleType | None
) -> tuple[Iterator[Result], str, int, Callable[[], None]]:
    """The runner's results, its name, its worker count and how to close it."""
    if ray is None:
        return run_in_process(tasks, spec), "in-process", 1, lambda: None
    local = settings.address is None
    if local:
        spec = _local_weights(spec)
        # A model that cannot load fails here, in one line, before any worker starts (on a
        # cluster the workers' error is reported instead: see _ray_failure).
        load_model(spec.model, spec.checkpoint, "cpu")
    started = connect(ray, settings.address)
    plan = plan_workers(ray.cluster_resources(), settings.workers, cpus_per_worker(spec))
    read_on_workers = local if settings.read_on_workers is None else settings.read_on_workers
    results = run_on_ray(ray, tasks, spec, plan, not read_on_workers, show_warnings=not local)
    return results, "ray", plan.workers, ray.shutdown if started else lambda: None


def _ray_failure(error: Exception) -> SeganyError:
    """One line for a run that Ray stopped; a worker's own SeganyError (a model it cannot
    load, ...) is named as such."""
    text = " ".join(str(error).split())
    own = re.findall(r"SeganyError: (.+?)(?: \(pid=| \^|$)", str(error), flags=re.MULTILINE)
    if own:
        return SeganyError(f"a Ray worker failed: {own[-1].strip()}")
    return SeganyError(
        f"the Ray run stopped ({type(error).__name__}: {text[:300]}); finished images are "
        "kept, rerun the same command to continue"
    )


def run_auto(
    jobs: list[Job],
    outdir: Path,
    spec: ModelSpec,
    settings: RunSettings,
    ray: ModuleType | None,
    overwrite: bool = False,
    on_result: Callable[[Result], None] | None = None,
) -> Summary:
    """Annotate every unfinished job (all of them with ``overwrite``) and write the
    outputs (see the module docstring); ``ray`` is from :func:`resolve_ray`.

    ``on_result`` is called with every result as it arrives (after its file is written).
    Returns the summary, also written to ``OUTDIR/summary.json``.
    """
    start = time.perf_counter()
    todo = [job for job in jobs if overwrite or not job.done()]
    summary = Summary(images=len(jobs), skipped_already_done=len(jobs) - len(todo))
    by_path = {str(job.path.resolve()): job for job in todo}
    tasks = [Task(path, job.image_id) for path, job in by_path.items()]
    results: Iterator[Result] = iter(())
    close: Callable[[], None] = lambda: None  # noqa: E731
    if tasks:  # connect before writing anything: a bad address leaves no trace
        results, summary.runner, summary.workers, close = _results(tasks, spec, settings, ray)
    outdir.mkdir(parents=True, exist_ok=True)
    failures = FailureLog(outdir / FAILURES_FILE, jobs)
    seen: set[str] = set()
    bar = tqdm(total=len(todo), desc="engine", unit="image", file=sys.stderr, disable=None)
    try:
        for result in results:
            if result.path in seen:
                continue  # a retried task may report an image twice; once is enough
            seen.add(result.path)
            if result.ok:
                write_text_atomic(by_path[result.path].main_output, result.document)
                summary.done_this_run += 1
                summary.masks += result.masks
            else:
                tqdm.write(f"segany engine: skipping {result.path}: {result.error}", sys.stderr)
                summary.failed += 1
            failures.set(result.path, result.error or None)
            bar.update()
            if on_result is not None:
                on_result(result)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    except Exception as error:
        if ray is not None and isinstance(error, ray.exceptions.RayError):
            summary.interrupted = True
            raise _ray_failure(error) from None
        raise
    finally:
        bar.close()
        close()
        failures.save()
        _finish(summary, jobs, outdir, time.perf_counter() - start)
    return summary


def _finish(summary: Summary, jobs: list[Job], outdir: Path, seconds: float) -> None:
    summary.done_total = sum(job.done() for job in jobs)
    summary.seconds = round(seconds, 3)
    summary.images_per_s = round(summary.done_this_run / seconds, 4) if seconds > 0 else 0.0
    summary.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_text_atomic(outdir / SUMMARY_FILE, json.dumps(asdict(summary), indent=2) + "\n")

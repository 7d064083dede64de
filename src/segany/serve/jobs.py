"""Long requests ("segment everything") as jobs: run one at a time, queued, cancellable.

A job's work runs in a worker thread, never in a request's thread, so the server keeps
answering while it runs; the worker exists only while there are jobs (an idle server, or
an app a test throws away, leaves no thread behind). The work reports its progress
through :meth:`Job.progress` between steps, and that is where a cancelled job stops:
:class:`JobCancelled` is raised there, so the work never writes half a result.

Statuses: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``; a running
job asked to stop is ``cancelling`` until its current step ends (it may still end
``done`` if that step was its last).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from ..errors import SeganyError
from .store import NotFound

JobStatus = Literal["queued", "running", "cancelling", "done", "failed", "cancelled"]

log = logging.getLogger(__name__)


class JobCancelled(SeganyError):
    """The job was cancelled by a client before it finished."""


class QueueFull(SeganyError):
    """As many jobs wait as the server allows."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(eq=False)
class Job:
    """One queued piece of work and what became of it.

    Attributes:
        id: the job's number (1, 2, ... per server).
        kind: what it does (``everything``).
        image_id: the image it works on.
        options: the request's options, as given.
        status: see the module docstring.
        steps_done, steps_total: progress (``steps_total`` is None until known).
        result: what the work returned, once ``done``.
        error: why it ``failed`` (or :class:`JobCancelled`), else None.
    """

    id: int
    kind: str
    image_id: int
    options: dict[str, Any]
    work: Callable[[Job], Any] = field(repr=False)
    status: JobStatus = "queued"
    steps_done: int = 0
    steps_total: int | None = None
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    result: Any = None
    error: Exception | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        return self._finished.wait(timeout)

    def progress(self, done: int, total: int) -> None:
        """Record progress; raises :class:`JobCancelled` if a client cancelled the job.
        The work calls it between steps: the only places it may stop."""
        self.steps_done, self.steps_total = done, total
        self.check()

    def check(self) -> None:
        """Raise :class:`JobCancelled` if a client cancelled the job (the work calls it
        last before writing its result, so a cancelled job writes nothing)."""
        if self._stop.is_set():
            raise JobCancelled(f"job {self.id} was cancelled")


class JobQueue:
    """Runs jobs one at a time in submission order.

    Args:
        max_waiting: jobs that may wait behind the running one; more raise
            :class:`QueueFull`.
        keep_finished: finished jobs remembered for :meth:`get` (oldest forgotten first).
    """

    def __init__(self, max_waiting: int, keep_finished: int) -> None:
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._finished: deque[Job] = deque(maxlen=keep_finished)
        self._next_id = 1
        self._worker: threading.Thread | None = None

    def submit(
        self, kind: str, image_id: int, options: dict[str, Any], work: Callable[[Job], Any]
    ) -> Job:
        """Queue ``work(job)``; its return value becomes the job's result."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(
                    f"{len(self._waiting)} jobs are already waiting (the server's limit); "
                    "try again when one has finished, or cancel one"
                )
            job = Job(self._next_id, kind, image_id, options, work)
            self._next_id += 1
            self._waiting.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="segany-jobs", daemon=True)
                self._worker.start()
        return job

    def jobs(self) -> list[Job]:
        """The running job, the waiting ones in order, then finished ones, newest first."""
        with self._lock:
            running = [] if self._running is None else [self._running]
            return running + list(self._waiting) + list(reversed(self._finished))

    def get(self, job_id: int) -> Job:
        for job in self.jobs():
            if job.id == job_id:
                return job
        raise NotFound(f"no job with id {job_id} (finished jobs are kept for a while only)")

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1 for the next to run, ...; None once finished."""
        with self._lock:
            if job is self._running:
                return 0
            if job in self._waiting:
                return self._waiting.index(job) + 1
            return None

    def cancel(self, job_id: int) -> Job:
        """Stop a job: a waiting one at once, the running one after its current step. A
        finished job is left as it is. Returns the job (its status says which)."""
        job = self.get(job_id)
        with self._lock:
            if job.status == "queued" and job in self._waiting:
                self._waiting.remove(job)
                job.error = JobCancelled(f"job {job.id} was cancelled before it started")
                self._finish(job, "cancelled")
            elif job.status == "running":
                job.status = "cancelling"
                job._stop.set()
        return job

    def shutdown(self, timeout: float) -> None:
        """Cancel every job and wait up to ``timeout`` seconds for the running one to stop
        (after its current step), so the process does not exit in the middle of it."""
        for job in self.jobs():
            if job.status in ("queued", "running"):
                self.cancel(job.id)
        worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _finish(self, job: Job, status: JobStatus) -> None:
        """Record the end of ``job`` (call with the lock held)."""
        job.status, job.finished_at = status, _now()
        self._finished.append(job)
        job._finished.set()

    def _run(self) -> None:
        """The worker: run jobs until none is waiting, then end."""
        while True:
            with self._lock:
                if not self._waiting:
                    self._worker = None
                    return
                job = self._running = self._waiting.popleft()
                job.status, job.started_at = "running", _now()
            status: JobStatus = "done"
            try:
                job.result = job.work(job)
            except JobCancelled as error:
                job.error, status = error, "cancelled"
            except Exception as error:  # the job fails; the server and queue go on
                if not isinstance(error, SeganyError):
                    log.exception("job %d (%s) failed", job.id, job.kind)
                job.error, status = error, "failed"
            with self._lock:
                self._running = None
                self._finish(job, status)

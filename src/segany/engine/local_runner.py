"""Annotating images in this process, one after another: the engine without Ray."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .annotate import Annotator, ModelSpec, Result, Task


def run_in_process(tasks: Iterable[Task], spec: ModelSpec) -> Iterator[Result]:
    """Annotate ``tasks`` in order; the model is loaded only if there is a task."""
    annotator: Annotator | None = None
    for task in tasks:
        if annotator is None:
            annotator = Annotator(spec)
        yield annotator(task)

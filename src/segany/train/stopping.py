"""Stopping training cleanly: Ctrl-C or SIGTERM ends the run at a step boundary, saved.

A run stopped this way keeps everything it finished: the checkpoint (``--resume`` goes on
bit for bit) and the model with the progress reached, as at the end of a ``--max-minutes``
chunk. SIGTERM is what a cluster's scheduler sends before it ends a job (SLURM, Kubernetes).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """While active (a ``with`` block), the first SIGINT or SIGTERM sets :attr:`requested`
    for the training loop to stop at its next step boundary; a second Ctrl-C stops at once
    (KeyboardInterrupt). Inactive off the main thread (Python delivers signals there only)
    and where ``enabled`` is False (several processes could stop at different steps)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if self.enabled:
            self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\nsegany: {signal.Signals(number).name}: stopping after this step and saving "
            "the checkpoint and the model (Ctrl-C again to stop at once, losing this step)",
            file=sys.stderr,
            flush=True,
        )

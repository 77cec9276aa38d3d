"""Preemption: turn SIGTERM and SIGINT into a request to stop at the next batch boundary.

Clusters preempt jobs with SIGTERM (and people press Ctrl-C). Stopping in the middle
of a batch would lose it; :class:`PreemptionHandler` only records the request, and
the ``Checkpoint`` callback answers it at the next batch boundary with a checkpoint
and a ``Stop("preempted")``, so the wind-down and every writer run. A second SIGINT
aborts at once with ``KeyboardInterrupt``. Previous handlers come back afterwards.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["PreemptionHandler"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class PreemptionHandler:
    """Records SIGTERM/SIGINT while installed; ``requested`` names the signal received."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[signal.Signals, _Handler] = {}

    @property
    def installed(self) -> bool:
        """Whether the handlers are in place (only possible in the main thread)."""
        return bool(self._previous)

    def install(self) -> None:
        """Install the handlers; a no-op outside the main thread, where Python forbids it."""
        self.requested = None
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

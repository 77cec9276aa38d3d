"""What the callbacks share about phases: ``"<phase>/<metric>"`` monitors and phase results.

The phases themselves (their names, their start and end events, which state lies in
which) are defined once in :mod:`statemachine_loop.events` and
:mod:`statemachine_loop.machine`.

Every logger needs the same two facts at a phase end: which phase closed, and its
final metric values. The values are read from the entry the loop appended to
``loop.history`` when the end was proposed (before any observer ran), not from
``loop.metrics``: that read would synchronise with the device a second time, and a
phase that ran no batch has no entry, so no one logs made-up ``nan`` values for it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from statemachine_loop.errors import ConfigError
from statemachine_loop.events import PHASES, Phase

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["PhaseResults", "format_value", "metric_names", "parse_monitor"]


def parse_monitor(owner: str, monitor: object) -> tuple[Phase, str]:
    """Split a ``"<phase>/<metric>"`` monitor; a ``ConfigError`` naming ``owner`` otherwise."""
    phase, _, metric = monitor.partition("/") if isinstance(monitor, str) else ("", "", "")
    if phase not in PHASES or not metric or "/" in metric:
        raise ConfigError(
            f"{owner} monitor must be 'training/<metric>' or 'validation/<metric>' "
            f"(e.g. 'validation/loss'); got {monitor!r}."
        )
    return phase, metric


class PhaseResults:
    """Finds the final metric values of the phase that just closed, without a device sync.

    Call :meth:`opened` from ``on_training_start`` / ``on_validation_start`` and
    :meth:`closed` from the matching end observer: it returns the phase's
    ``History`` entry (without its ``"epoch"`` key) when the loop appended one at
    this end, else ``None`` (the phase ran no batch).
    """

    def __init__(self) -> None:
        self._entries_at_open = 0

    def opened(self, loop: LoopView, phase: Phase) -> None:
        """Remember how many history entries the phase had when it opened."""
        self._entries_at_open = len(getattr(loop.history, phase))

    def closed(self, loop: LoopView, phase: Phase) -> dict[str, float] | None:
        """The phase's final metric values, or ``None`` when it ran no batch."""
        entries = getattr(loop.history, phase)
        if len(entries) <= self._entries_at_open:
            return None
        return {name: value for name, value in entries[-1].items() if name != "epoch"}


def metric_names(loop: LoopView) -> list[str]:
    """The names of the metrics the loop tracks, ``loss`` first.

    Prefers a ``loop.metric_names`` attribute; without one, reads the keys of
    ``loop.metrics`` (once per fit: it computes each metric, which is cheap before
    the first batch).
    """
    names = getattr(loop, "metric_names", None)
    if names is not None:
        return list(names)
    return list(loop.metrics)


def format_value(value: float) -> str:
    """A metric value for humans: four significant digits, ``nan``/``inf`` as is."""
    if math.isfinite(value):
        return f"{value:.4g}"
    return str(value)

"""``StructuredLogger``: every taken transition as a JSON line, for ``smloop logs``.

One record per transition the machine takes, plus records for each phase's
metrics, a stop and a failure; every record carries the fit's ``run_id``. The
format (fields and types) is documented in ``docs/logging.md`` and read back by
:mod:`statemachine_loop.logs`; ``smloop logs validate`` replays the transitions
through the lifecycle machine.

The logger is a private structlog pipeline built with ``structlog.wrap_logger``
(explicit processors, wrapper and context classes): it never calls
``structlog.configure``, so the user's own structlog setup is untouched and does
not leak into the file.

Per-batch events (:data:`~statemachine_loop.events.BATCH_EVENTS`) are logged at debug
level. Below debug the callback does not even hook them: ``__init__`` sets those
``on_<event>`` attributes to ``None``, so the loop never calls it per batch and an INFO
log stays epoch-sized.
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, TextIO

import structlog

from statemachine_loop.callback import Callback
from statemachine_loop.callbacks._files import make_directory
from statemachine_loop.callbacks._phases import PhaseResults, metric_names
from statemachine_loop.decisions import DecisionKind
from statemachine_loop.errors import ConfigError
from statemachine_loop.events import BATCH_EVENTS, PHASE_END, PHASE_OF_EVENT, PHASE_START, Event
from statemachine_loop.machine import PHASE_OF_STATE

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["FIELD_ORDER", "LEVELS", "LOG_FORMAT", "StructuredLogger"]

#: Version of the JSONL format, written on each ``fit_start`` record as ``log_format``.
LOG_FORMAT: Final = 1

#: Level names the logger accepts, and their ``logging`` numbers.
LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: The fields every record starts with, in this order; kind-specific fields follow.
FIELD_ORDER: Final[tuple[str, ...]] = (
    "timestamp",
    "level",
    "run_id",
    "kind",
    "event",
    "elapsed_s",
    "epoch_index",
    "batch_index",
    "phase",
)

_EventDict = MutableMapping[str, Any]


def _json_safe(value: Any) -> Any:
    """Non-finite floats as the strings ``nan``, ``inf``, ``-inf``: strict JSON has no NaN.

    Floats appear at the top level and in the ``metrics`` mapping only, so one level
    of mappings is enough.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {
            key: item if not isinstance(item, float) or math.isfinite(item) else str(item)
            for key, item in value.items()
        }
    return value


#: The only types :func:`_json_safe` may change.
_MAYBE_UNSAFE: Final = (float, dict)
#: The events that open a phase.
_PHASE_STARTS: Final = frozenset(PHASE_START.values())
#: The events that close a phase.
_PHASE_ENDS: Final = frozenset(PHASE_END.values())


def _finish(_: Any, __: str, event_dict: _EventDict) -> _EventDict:
    """Order the common fields first and make values strict-JSON safe."""
    ordered = {key: event_dict.pop(key) for key in FIELD_ORDER if key in event_dict}
    ordered.update(event_dict)
    for key, value in ordered.items():
        if isinstance(value, _MAYBE_UNSAFE):
            ordered[key] = _json_safe(value)
    return ordered


def _drop_empty(_: Any, __: str, event_dict: _EventDict) -> _EventDict:
    """For the console: leave out fields that say nothing (``None``, empty lists)."""
    return {key: value for key, value in event_dict.items() if value is not None and value != []}


def new_run_id() -> str:
    """A run id that sorts by start time and is unique: ``YYYYmmddTHHMMSS-<6 hex>``."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def _exception_type(error: BaseException) -> str:
    cls = type(error)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _observer(event: Event) -> Callable[[StructuredLogger, LoopView], None]:
    def observe(self: StructuredLogger, loop: LoopView) -> None:
        self._transition(loop, event)

    observe.__name__ = f"on_{event.value}"
    observe.__doc__ = f"Log the ``{event.value}`` transition."
    return observe


class StructuredLogger(Callback):
    """Logs every taken transition, phase metrics, stops and failures as JSON lines.

    Args:
        path: the JSONL file; parent directories are created. Each ``fit`` replaces
            it unless ``append`` is true or the fit resumes from a checkpoint (the
            readers tell fits apart by ``run_id``).
        level: ``"debug"`` (also per-batch events), ``"info"`` (default: transitions
            of fit, epoch and phase scopes, metrics, stops), ``"warning"`` (stops and
            failures) or ``"error"`` (failures only).
        console: also render each record for humans on standard error, with
            structlog's ``ConsoleRenderer``.
        append: add to an existing file instead of replacing it.

    ``run_id`` is the current (or last) fit's id. Each transition record lists the
    decisions recorded since the previous record, so every decision is logged once,
    in the first record written after it. The logger runs after the other callbacks
    (``runs_last``), so its record of an event follows their work on it. A vetoed
    ``fit_start`` takes no transition, so it leaves no log. Under ``torch.distributed``
    only the main process writes.
    """

    runs_last: ClassVar[bool] = True

    def __init__(
        self,
        path: str | Path = "run/events.jsonl",
        level: str = "info",
        console: bool = False,
        *,
        append: bool = False,
    ) -> None:
        if not isinstance(level, str) or level.lower() not in LEVELS:
            raise ConfigError(f"level must be one of {list(LEVELS)}; got {level!r}.")
        self.path = Path(path)
        self.level = level.lower()
        self.console = console
        self.run_id: str | None = None
        self._append = append
        self._min_level = LEVELS[self.level]
        self._file: TextIO | None = None
        self._loggers: list[Any] = []
        self._start = 0.0
        self._decisions_logged = 0
        self._stop_logged = False
        self._failure_logged = False
        self._results = PhaseResults()
        if self._min_level > logging.DEBUG:
            for event in BATCH_EVENTS:  # not even called per batch: see Callback's docstring
                setattr(self, f"on_{event.value}", None)

    def record(
        self, loop: LoopView, kind: str, event: Event, level: str = "info", **fields: Any
    ) -> None:
        """Add a record of another ``kind`` to the current fit's log.

        The extension point for records this module does not write itself
        (``resume`` and ``checkpoint`` records, say): the common fields (time,
        level, run id, elapsed time, epoch and batch index, phase) are filled in,
        ``fields`` follow them. Readers show unknown kinds as they are and replay
        only ``transition`` records. Does nothing outside a fit.
        """
        if level not in LEVELS:
            raise ConfigError(f"level must be one of {list(LEVELS)}; got {level!r}.")
        self._emit(LEVELS[level], self._common(loop, kind, event), fields)

    # -- the transitions -------------------------------------------------------------

    def _transition(self, loop: LoopView, event: Event) -> None:
        if event is Event.FIT_START:
            self._begin(loop)
        if loop.failure is not None and not self._failure_logged:
            self._failure_logged = True
            error = loop.failure
            self.record(
                loop, "failure", event, "error",
                exception_type=_exception_type(error), message=str(error),
            )  # fmt: skip
        if loop.stop_reason is not None and not self._stop_logged:
            self._log_stop(loop, event)
        common = self._common(loop, "transition", event)
        fields: dict[str, Any] = {
            "from_state": loop.previous_state,
            "to_state": loop.state,
            "resuming": loop.resuming,
            "decisions": [record.as_dict() for record in loop.decisions[self._decisions_logged :]],
        }
        self._decisions_logged = len(loop.decisions)
        if event is Event.FIT_START:
            fields.update(
                log_format=LOG_FORMAT,
                engine=loop.engine,
                epoch_count=loop.epoch_count,
                metric_names=metric_names(loop),
                resumed_from=getattr(loop, "resumed_from", None),
            )
        elif event in _PHASE_STARTS:
            self._results.opened(loop, PHASE_OF_EVENT[event])
            fields["batch_count"] = loop.batch_count
        elif event is Event.FIT_END:
            fields.update(
                stop_reason=loop.stop_reason,
                failure=None if loop.failure is None else _exception_type(loop.failure),
            )
        level = logging.DEBUG if event in BATCH_EVENTS else logging.INFO
        self._emit(level, common, fields)
        if event in _PHASE_ENDS:
            values = self._results.closed(loop, PHASE_OF_EVENT[event])
            if values is not None:
                self._emit(logging.INFO, self._common(loop, "metrics", event), {"metrics": values})
        if event is Event.FIT_START and getattr(loop, "resumed_from", None) is not None:
            self._emit(
                logging.INFO,
                self._common(loop, "resume", event),
                {"resumed_from": loop.resumed_from},
            )
        if event is Event.FIT_END:
            self._end()

    def _log_stop(self, loop: LoopView, event: Event) -> None:
        self._stop_logged = True
        applied = next(
            (d for d in loop.decisions if d.kind is DecisionKind.STOP and d.applied), None
        )
        common = self._common(loop, "stop", event if applied is None else applied.event)
        if applied is not None:
            in_batch = applied.event in BATCH_EVENTS
            common.update(
                epoch_index=applied.epoch_index,
                batch_index=applied.batch_index if in_batch else None,
                phase=PHASE_OF_STATE.get(applied.state) or PHASE_OF_EVENT.get(applied.event),
            )
        self._emit(
            logging.WARNING,
            common,
            {"reason": loop.stop_reason, "callback": None if applied is None else applied.callback},
        )

    # -- the pipeline ----------------------------------------------------------------

    def _begin(self, loop: LoopView) -> None:
        self._end()
        self.run_id = new_run_id()
        self._start = time.monotonic()
        self._decisions_logged = 0
        self._stop_logged = self._failure_logged = False
        if not loop.is_main_process:
            return  # under torch.distributed rank 0 alone writes; the others log nothing
        make_directory(self.path.parent)
        append = self._append or loop.resuming
        if not append:
            self.path.unlink(missing_ok=True)  # a fresh file: see CSVLogger.on_fit_start
        self._file = self.path.open("a" if append else "w", encoding="utf-8")
        wrapper = structlog.make_filtering_bound_logger(self._min_level)
        timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
        json_logger = structlog.wrap_logger(
            structlog.WriteLogger(self._file),
            processors=[
                structlog.processors.add_log_level,
                timestamper,
                _finish,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=wrapper,
            context_class=dict,
        )
        self._loggers = [json_logger.bind(run_id=self.run_id)]
        if self.console:
            console_logger = structlog.wrap_logger(
                structlog.PrintLogger(sys.stderr),
                processors=[
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="%H:%M:%S", key="timestamp"),
                    _drop_empty,
                    structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
                ],
                wrapper_class=wrapper,
                context_class=dict,
            )
            self._loggers.append(console_logger.bind(run_id=self.run_id))

    def _end(self) -> None:
        self._loggers = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def _common(self, loop: LoopView, kind: str, event: Event) -> dict[str, Any]:
        in_batch = event in BATCH_EVENTS
        in_fit = event is not Event.FIT_START and event is not Event.FIT_END
        state, previous = loop.state, loop.previous_state
        return {
            "kind": kind,
            "event": event.value,
            "elapsed_s": round(time.monotonic() - self._start, 6),
            "epoch_index": loop.epoch_index if in_fit else None,
            "batch_index": loop.batch_index if in_batch else None,
            "phase": PHASE_OF_STATE.get(state) or PHASE_OF_STATE.get(previous),
        }

    def _emit(self, level: int, common: dict[str, Any], fields: dict[str, Any]) -> None:
        event = common.pop("event")
        for logger in self._loggers:
            logger.log(level, event, **common, **fields)


for _event in Event:
    setattr(StructuredLogger, f"on_{_event.value}", _observer(_event))
del _event

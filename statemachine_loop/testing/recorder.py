"""``TraceRecorder``: a callback that records every event the loop takes."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from statemachine_loop.callback import Callback
from statemachine_loop.events import Event
from statemachine_loop.trace import TraceEntry

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["TraceEntry", "TraceRecorder"]


def _observer(event: Event) -> object:
    def observe(self: TraceRecorder, loop: LoopView) -> None:
        self.entries.append(
            TraceEntry(
                event=event,
                state=loop.state,
                epoch_index=loop.epoch_index,
                batch_index=loop.batch_index,
                is_training=loop.is_training,
                resuming=loop.resuming,
                stop_reason=loop.stop_reason,
                failed=loop.failure is not None,
            )
        )

    observe.__name__ = f"on_{event.value}"
    observe.__doc__ = f"Record that ``{event.value}`` was taken."
    return observe


class TraceRecorder(Callback):
    """Records every taken event as a :class:`TraceEntry`, in order.

    Put it last in the callback list to see the loop as the other callbacks left
    it. ``events`` gives the bare event sequence, the form golden traces are written
    in; ``entries`` keeps indices and flags for invariant checks.
    """

    may_stop: ClassVar[bool] = False

    def __init__(self) -> None:
        self.entries: list[TraceEntry] = []

    @property
    def events(self) -> list[Event]:
        """The taken events, in order."""
        return [entry.event for entry in self.entries]

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.entries.clear()


for _event in Event:
    setattr(TraceRecorder, f"on_{_event.value}", _observer(_event))
del _event

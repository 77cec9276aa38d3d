"""Per-batch losses a logger has noted but not written yet, read from the device in chunks.

``CSVLogger`` and ``TensorBoardLogger`` write every batch's loss, yet must not read
the device per batch. The built-in loss metric already keeps each batch's detached
loss (``TrainingLoop.batch_losses``), so a logger only notes *that* a batch's loss is
there and reads the values when it writes a chunk: no second ``detach`` per batch. It
detaches a loss itself only when the metric has none for it: a user's own ``loss``
metric, which keeps no record, or a stop that came between the loss and the metrics
(a ``Stop`` at ``update_start``), which is always a phase's last batch.

Nothing here keeps ``loop.last_step_loss`` itself: holding a loss holds its autograd
graph, which would outlive the next batch's and slow every allocation after it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from statemachine_loop.loop import TrainingLoop

__all__ = ["PendingLosses"]


class _Recorded(enum.Enum):
    """Marks a batch whose loss is the loss metric's next recorded one."""

    LOSS = "recorded"


_RECORDED = _Recorded.LOSS


class PendingLosses:
    """The losses of the batches noted since the last :meth:`take`, in order."""

    def __init__(self) -> None:
        self._marks: list[torch.Tensor | _Recorded] = []
        self._shared = False
        self._consumed = 0  # entries of the phase's loss record already taken

    def bind(self, loop: TrainingLoop) -> None:
        """Start a fit: nothing pending, and whether the loop keeps a loss record."""
        self._marks = []
        self._shared = loop.batch_losses() is not None
        self._consumed = 0

    def phase_opened(self) -> None:
        """A phase started: the loss metric's record starts again from its first batch."""
        self._consumed = 0

    def add(self, loop: TrainingLoop, loss: torch.Tensor) -> None:
        """Note ``loss``, the current batch's ``last_step_loss`` (not ``None``)."""
        # The loss metric recorded this loss, unless a stop came between the two.
        if self._shared and loop.stop_reason is None:
            self._marks.append(_RECORDED)
        else:
            self._marks.append(loss.detach())

    def take(self, loop: TrainingLoop) -> tuple[list[float], torch.dtype | None]:
        """The pending losses as floats, in order, and their dtype; nothing is pending after.

        One device read per source: a slice of the loss record, and a stack of the
        few losses detached here.
        """
        marks, self._marks = self._marks, []
        recorded = sum(1 for mark in marks if mark is _RECORDED)
        record = loop.batch_losses() if recorded else None
        if record is not None:
            start, self._consumed = self._consumed, self._consumed + recorded
            record = record[start : self._consumed]
        recorded_values = [] if record is None else record.tolist()
        own = [mark for mark in marks if isinstance(mark, torch.Tensor)]
        if not own:
            return recorded_values, None if record is None else record.dtype
        detached = torch.stack(own)
        from_record, from_own = iter(recorded_values), iter(detached.tolist())
        values = [next(from_record if mark is _RECORDED else from_own) for mark in marks]
        return values, detached.dtype

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

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from statemachine_loop.loop import TrainingLoop

__all__ = ["PendingLosses"]


class PendingLosses:
    """The losses of the batches noted since the last :meth:`take`, in order."""

    def __init__(self) -> None:
        self._noted = 0  # batches noted since the last take
        # (position among the noted, detached loss) of the losses the record lacks.
        self._own: list[tuple[int, torch.Tensor]] = []
        self._shared = False
        self._consumed = 0  # entries of the phase's loss record already taken

    def bind(self, loop: TrainingLoop) -> None:
        """Start a fit: nothing pending, and whether the loop keeps a loss record."""
        self._noted, self._own = 0, []
        self._shared = loop.batch_losses() is not None
        self._consumed = 0

    def phase_opened(self) -> None:
        """A phase started: the loss metric's record starts again from its first batch."""
        self._consumed = 0

    def add(self, loop: TrainingLoop, loss: torch.Tensor) -> None:
        """Note ``loss``, the current batch's ``last_step_loss`` (not ``None``)."""
        # The loss metric recorded this loss, unless a stop came between the two.
        if not self._shared or loop.stop_reason is not None:
            self._own.append((self._noted, loss.detach()))
        self._noted += 1

    def take(self, loop: TrainingLoop) -> tuple[list[float], torch.dtype | None]:
        """The pending losses as floats, in order, and their dtype; nothing is pending after.

        One device read per source: a slice of the loss record, and a stack of the
        few losses detached here.
        """
        noted, own = self._noted, self._own
        self._noted, self._own = 0, []
        recorded = noted - len(own)
        record = loop.batch_losses() if recorded else None
        if record is not None:
            start, self._consumed = self._consumed, self._consumed + recorded
            record = record[start : self._consumed]
        values = [] if record is None else record.tolist()
        if not own:
            return values, None if record is None else record.dtype
        detached = torch.stack([loss for _, loss in own])
        # In increasing position, each insert lands where that batch was noted.
        for (position, _), value in zip(own, detached.tolist(), strict=True):
            values.insert(position, value)
        return values, detached.dtype

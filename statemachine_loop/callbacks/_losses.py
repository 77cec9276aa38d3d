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
    from statemachine_loop.view import LoopView

__all__ = ["PendingLosses"]


class PendingLosses:
    """The losses a logger's pending batches had, read from the device in chunks.

    The logger counts the batches it notes itself (their position is its own list's
    length); on the per-batch path it checks :attr:`recorded` and the loop's
    ``stop_reason``, and only when the loss metric has no entry for the batch hands
    the loss to :meth:`keep`.
    """

    def __init__(self) -> None:
        #: Whether the loop's loss metric records every scored batch's loss (the built-in
        #: one does; a user's own ``loss`` metric does not). Set by :meth:`bind`.
        self.recorded = False
        # (position among the noted batches, detached loss) of the losses the record lacks.
        self._own: list[tuple[int, torch.Tensor]] = []
        self._consumed = 0  # entries of the phase's loss record already taken

    def bind(self, loop: LoopView) -> None:
        """Start a fit: nothing pending, and whether the loop keeps a loss record."""
        self._own = []
        self.recorded = loop.batch_losses() is not None
        self._consumed = 0

    def phase_opened(self) -> None:
        """A phase started: the loss metric's record starts again from its first batch."""
        self._consumed = 0

    def keep(self, position: int, loss: torch.Tensor) -> None:
        """Keep the loss of the noted batch at ``position``: the record has none for it.

        That is every batch when not :attr:`recorded`, and otherwise a batch whose
        loss came before a stop (``loop.stop_reason`` set: a ``Stop`` at
        ``update_start`` skips the metrics), always a phase's last.
        """
        self._own.append((position, loss.detach()))

    def take(self, loop: LoopView, noted: int) -> tuple[list[float], torch.dtype | None]:
        """The losses of the ``noted`` batches since the last take, in order, and their dtype.

        One device read per source: a slice of the loss record, and a stack of the
        few losses kept here. Nothing is pending afterwards.
        """
        own, self._own = self._own, []
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

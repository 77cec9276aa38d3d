"""``TensorBoardLogger``: per-epoch metrics of both phases and per-batch training curves.

Each ``fit`` writes into a new run directory under ``logdir``, named after the
time it started (``20250101-120000``, then ``20250101-120000-1`` ... if that
exists), with one sub-run per phase so TensorBoard overlays their curves::

    run/tensorboard/stats/20250101-120000/training/events.out.tfevents...
    run/tensorboard/stats/20250101-120000/validation/events.out.tfevents...

Scalars (the same tags in both sub-runs, so training and validation share a chart):

* ``epoch/<metric>`` — every metric's final phase value, step = 0-based epoch index;
* ``batch/loss`` and ``batch/learning_rate`` (training only) — each training batch's
  loss and ``optimizer.param_groups[0]["lr"]`` (read at ``batch_end``, so a schedule
  that sets it at ``batch_start`` shows the rate of that batch's update), step =
  ``epoch_index * batch_count + batch_index``: the batch's position in the whole
  run, the same after a resume; for data without ``len`` a count of training
  batches so far in this fit.

Per-batch losses stay on the device and are written in chunks (phase end, every
``flush_every`` seconds, ``fit_end``) with one ``tolist()`` each, so logging never
synchronises per batch; they are the ones the loss metric keeps anyway
(``TrainingLoop.batch_losses``), so a batch costs no second ``detach``. The writers
are closed at ``fit_end``, which also runs during the wind-down after an exception.
"""

from __future__ import annotations

import time
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING

import torch
from tensorboardX import SummaryWriter

from statemachine_loop.callback import Callback
from statemachine_loop.callbacks._files import make_directory
from statemachine_loop.callbacks._losses import PendingLosses
from statemachine_loop.callbacks._phases import PhaseResults
from statemachine_loop.errors import ConfigError
from statemachine_loop.events import TRAINING, VALIDATION, Phase

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["TensorBoardLogger", "unique_run_dir"]


def unique_run_dir(logdir: Path, stamp: str | None = None) -> Path:
    """Create and return a new directory ``logdir/<stamp>``, suffixed ``-1``, ``-2``... if taken.

    ``stamp`` defaults to the local time as ``YYYYmmdd-HHMMSS``. Creation is the
    uniqueness test (``mkdir`` without ``exist_ok``), so two runs started in the same
    second never share a directory.
    """
    make_directory(logdir)
    base = stamp if stamp is not None else time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while True:
        candidate = logdir / (base if suffix == 0 else f"{base}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        return candidate


class TensorBoardLogger(Callback):
    """Writes TensorBoard scalars with tensorboardX, one run directory per ``fit``.

    Args:
        logdir: the parent of the per-fit run directories; point
            ``tensorboard --logdir`` at it.
        flush_every: seconds between writes of buffered per-batch scalars within a
            training phase (they are also written at each phase end and at ``fit_end``).

    ``run_dir`` is the current (or last) fit's run directory, ``None`` before the
    first fit. Under ``torch.distributed`` only the main process writes.
    """

    def __init__(
        self, logdir: str | Path = "run/tensorboard/stats", *, flush_every: float = 10.0
    ) -> None:
        if isinstance(flush_every, bool) or not (
            isinstance(flush_every, int | float) and flush_every > 0
        ):
            raise ConfigError(f"flush_every must be a number of seconds > 0; got {flush_every!r}.")
        self.logdir = Path(logdir)
        self.run_dir: Path | None = None
        self._flush_every = float(flush_every)
        self._writers: dict[Phase, SummaryWriter] = {}
        self._results = PhaseResults()
        self._step = 0
        self._active = True
        self._steps: list[int] = []
        self._losses = PendingLosses()
        self._rates: list[float | torch.Tensor] = []
        self._next_flush = 0.0

    def on_fit_start(self, loop: LoopView) -> None:
        """Create this fit's run directory (on the main process only)."""
        self._close_writers()
        self._step = 0
        self._steps, self._rates = [], []
        self._active = loop.is_main_process
        if not self._active:
            return
        self._losses.bind(loop)
        self.run_dir = unique_run_dir(self.logdir)

    def on_training_start(self, loop: LoopView) -> None:
        """Note the phase, and when the first chunk is due."""
        self._results.opened(loop, TRAINING)
        self._losses.phase_opened()
        self._next_flush = monotonic() + self._flush_every

    def on_validation_start(self, loop: LoopView) -> None:
        """Note the phase."""
        self._results.opened(loop, VALIDATION)

    def on_batch_end(self, loop: LoopView) -> None:
        """Buffer a training batch's detached loss and learning rate; write a chunk when due."""
        if not loop.is_training or loop.failure is not None or not self._active:
            return
        loss = loop.last_step_loss  # reset to None when each batch is fetched
        if loss is None:
            return  # no loss this batch (a stop before its forward pass)
        if not self._losses.recorded or loop.stop_reason is not None:
            self._losses.keep(len(self._steps), loss)
        count = loop.batch_count
        self._steps.append(
            self._step if count is None else loop.epoch_index * count + loop.batch_index
        )
        self._rates.append(loop.optimizer.param_groups[0]["lr"])
        self._step += 1
        if monotonic() >= self._next_flush:
            self._flush_batches(loop)

    def on_training_end(self, loop: LoopView) -> None:
        """Write the buffered batches and the phase's per-epoch scalars."""
        self._flush_batches(loop)
        self._write_epoch(loop, TRAINING)

    def on_validation_end(self, loop: LoopView) -> None:
        """Write the validation phase's per-epoch scalars."""
        self._write_epoch(loop, VALIDATION)

    def on_fit_end(self, loop: LoopView) -> None:
        """Write anything pending and close the writers (also after a failure)."""
        try:
            self._flush_batches(loop)
        finally:
            self._close_writers()

    # -- work ------------------------------------------------------------------------

    def _writer(self, phase: Phase) -> SummaryWriter:
        writer = self._writers.get(phase)
        if writer is None:
            assert self.run_dir is not None
            writer = self._writers[phase] = SummaryWriter(logdir=str(self.run_dir / phase))
        return writer

    def _flush_batches(self, loop: LoopView) -> None:
        self._next_flush = monotonic() + self._flush_every
        if not self._steps:
            return
        steps, rates = self._steps, self._rates
        self._steps, self._rates = [], []
        writer = self._writer(TRAINING)
        values, _ = self._losses.take(loop, len(steps))
        for step, value, rate in zip(steps, values, rates, strict=True):
            writer.add_scalar("batch/loss", value, step)
            writer.add_scalar("batch/learning_rate", float(rate), step)
        writer.flush()

    def _write_epoch(self, loop: LoopView, phase: Phase) -> None:
        values = self._results.closed(loop, phase)
        if values is None or not self._active:
            return
        writer = self._writer(phase)
        for name, value in values.items():
            writer.add_scalar(f"epoch/{name}", value, loop.epoch_index)
        writer.flush()

    def _close_writers(self) -> None:
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.close()

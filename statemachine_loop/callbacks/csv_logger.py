"""``CSVLogger``: one CSV row per batch of both phases, written in whole-line chunks.

The file is a plain table that ``csv`` and pandas read as is::

    epoch,batch,phase,loss,accuracy
    0,0,training,0.7120,
    0,1,training,0.6931,
    ...
    0,149,training,0.2210,0.9132
    0,0,validation,0.2402,
    ...

* ``epoch`` and ``batch`` are the loop's 0-based ``epoch_index`` and ``batch_index``
  (a batch vetoed at ``batch_start`` has no row, so indices may skip).
* ``loss`` is *that batch's* loss (``loop.last_step_loss``); it is empty when the
  batch produced none (its ``inference_prediction_end`` was vetoed, or a stop came
  before its forward pass).
* Every other metric column is empty on batch rows, except on the **last row of
  each phase**, which holds the phase's final value (the one in ``History``).
  Per-batch values of accuracy-like metrics would need a device read per batch;
  phase values are exact and cost nothing extra. ``df.dropna(subset=["accuracy"])``
  gives one row per phase.

Losses stay on the device until a chunk is written: at each phase end, every
``flush_every`` seconds, and at ``fit_end`` (which also runs after an exception).
They are the ones the built-in loss metric already keeps
(``TrainingLoop.batch_losses``), so a batch costs no second ``detach``; the logger
detaches a loss itself only when the metric has none for it (a user's own ``loss``
metric, or a stop between the loss and the metrics). A chunk costs one
``tolist()`` and one write of whole lines, then a flush, so after a crash the file
holds every completed row and no partial line. The batch an exception interrupted
gets no row.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, TextIO

import torch

from statemachine_loop.callback import Callback
from statemachine_loop.callbacks._files import make_directory
from statemachine_loop.callbacks._losses import PendingLosses
from statemachine_loop.callbacks._phases import PhaseResults, metric_names
from statemachine_loop.errors import ConfigError
from statemachine_loop.events import TRAINING, VALIDATION, Phase

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["CSVLogger"]


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class CSVLogger(Callback):
    """Writes one row per batch to ``path``: ``epoch,batch,phase,<metric columns>``.

    Args:
        path: the CSV file; parent directories are created. Each ``fit`` replaces
            it, unless ``append`` is true or the fit resumes from a checkpoint (then
            the header is written only to an empty file, and must match the columns
            already there; rows logged between the checkpoint and an interruption
            appear again after them).
        flush_every: seconds between chunk writes within a phase; chunks are also
            written at each phase end and at ``fit_end``.
        append: add to an existing file instead of replacing it.

    Under ``torch.distributed`` only the main process (``loop.is_main_process``)
    writes; every rank keeps the same hooks, so the ranks stay in step.
    """

    def __init__(
        self, path: str | Path = "run/log.csv", *, flush_every: float = 5.0, append: bool = False
    ) -> None:
        if isinstance(flush_every, bool) or not (
            isinstance(flush_every, int | float) and flush_every > 0
        ):
            raise ConfigError(f"flush_every must be a number of seconds > 0; got {flush_every!r}.")
        self.path = Path(path)
        self._flush_every = float(flush_every)
        self._append = append
        self._file: TextIO | None = None
        self._columns: list[str] = []
        self._phase: Phase = TRAINING
        self._results = PhaseResults()
        self._epoch = 0
        self._active = True
        self._batches: list[int] = []  # the pending rows' batch indices
        self._blank: set[int] = set()  # positions of pending rows without a loss
        self._losses = PendingLosses()
        self._next_flush = 0.0

    def on_fit_start(self, loop: LoopView) -> None:
        """Open the file and write the header (on the main process only)."""
        self._close_file()
        self._batches, self._blank = [], set()
        self._active = loop.is_main_process
        if not self._active:
            return
        self._losses.bind(loop)
        self._columns = metric_names(loop)
        header: list[object] = ["epoch", "batch", "phase", *self._columns]
        make_directory(self.path.parent)
        append = self._append or loop.resuming
        has_rows = append and self.path.exists() and self.path.stat().st_size > 0
        if has_rows:
            with self.path.open(newline="") as existing:
                found = next(csv.reader(existing), [])
            if found != header:
                raise ConfigError(
                    f"CSVLogger(append=True) cannot add to {self.path}: its header is "
                    f"{found} but this fit logs {header}."
                )
        if not append:
            # A new file, not a truncated one: ext4 flushes a file replaced by
            # truncation to disk when it is closed, which would stall the fit.
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a" if append else "w", newline="")
        if not has_rows:
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerow(header)
            self._write(text.getvalue())

    def on_training_start(self, loop: LoopView) -> None:
        """Rows from here on belong to the training phase."""
        self._open(loop, TRAINING)

    def on_validation_start(self, loop: LoopView) -> None:
        """Rows from here on belong to the validation phase."""
        self._open(loop, VALIDATION)

    def on_batch_end(self, loop: LoopView) -> None:
        """Keep the batch's row and detached loss; write the pending chunk when it is due."""
        if loop.failure is not None or not self._active:
            return  # the batch an exception interrupted is not a completed row
        if monotonic() >= self._next_flush and self._batches:
            self._flush(loop)  # pending rows only: the current row may still be the phase's last
        loss = loop.last_step_loss  # reset to None when each batch is fetched
        if loss is None:
            self._blank.add(len(self._batches))
        elif not self._losses.recorded or loop.stop_reason is not None:
            self._losses.keep(len(self._batches) - len(self._blank), loss)
        self._batches.append(loop.batch_index)

    def on_training_end(self, loop: LoopView) -> None:
        """Write the phase's rows, its final metric values on the last one."""
        self._flush(loop, self._results.closed(loop, TRAINING))

    def on_validation_end(self, loop: LoopView) -> None:
        """Write the phase's rows, its final metric values on the last one."""
        self._flush(loop, self._results.closed(loop, VALIDATION))

    def on_fit_end(self, loop: LoopView) -> None:
        """Write anything still pending and close the file (also after a failure)."""
        try:
            if self._batches:
                self._flush(loop)
        finally:
            self._close_file()

    # -- work ------------------------------------------------------------------------

    def _open(self, loop: LoopView, phase: Phase) -> None:
        self._phase, self._epoch = phase, loop.epoch_index
        self._results.opened(loop, phase)
        self._losses.phase_opened()
        self._next_flush = monotonic() + self._flush_every

    def _flush(self, loop: LoopView, finals: dict[str, float] | None = None) -> None:
        batches, blank = self._batches, self._blank
        self._batches, self._blank = [], set()
        self._next_flush = monotonic() + self._flush_every
        if not batches:
            return
        values, dtype = self._losses.take(loop, len(batches) - len(blank))
        # Nine significant digits give back every float32 (and float16) exactly, without
        # the noise digits of the shortest repr of its widened double.
        number = "%r" if dtype == torch.float64 else "%.9g"
        # Rows hold only numbers and a phase name, so no quoting is ever needed.
        head, tail = f"{self._epoch},", f",{self._phase},"
        blanks = "," * (len(self._columns) - 1)
        if blank or len(values) != len(batches):
            found = iter([number % value for value in values])
            cells = ["" if index in blank else next(found, "") for index in range(len(batches))]
            row = f"{head}%d{tail}%s{blanks}\n"
            lines = [row % pair for pair in zip(batches, cells, strict=True)]
            last_cell = cells[-1]
        else:  # every row has its loss: the usual case, one format per row
            row = f"{head}%d{tail}{number}{blanks}\n"
            lines = [row % pair for pair in zip(batches, values, strict=True)]
            last_cell = number % values[-1]
        if finals:
            last = "".join(f",{_number(finals.get(name))}" for name in self._columns[1:])
            lines[-1] = f"{head}{batches[-1]}{tail}{last_cell}{last}\n"
        self._write("".join(lines))

    def _write(self, text: str) -> None:
        """Write whole lines at once, then flush: a crash never leaves half a row."""
        if self._file is None:
            return
        self._file.write(text)
        self._file.flush()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""``ProgressBar``: watch a run while it trains, at almost no cost per batch.

On an interactive terminal (or in Jupyter) it shows a rich progress display per
phase — batch ``i/N``, elapsed time, ETA, throughput and the running metrics — and
leaves one summary line per finished phase above it. Anywhere else (CI logs, a file,
a pipe) it prints only that summary line, one per phase end, with no control
characters.

On a live display the per-batch work is one ``time.monotonic()`` compare. Only when
a refresh is due (at most ``refresh_per_second`` times a second) does it read
``loop.metrics``, which synchronises with the device, and redraw; the display is
refreshed by hand, with no background thread. Anywhere else it does not hook
``batch_end`` at all (the phase's batch count is ``loop.batches_run``), so with no
other per-batch callback the loop runs its batches with no hook call.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from statemachine_loop.callback import Callback
from statemachine_loop.callbacks._phases import PhaseResults, format_value
from statemachine_loop.errors import ConfigError
from statemachine_loop.events import TRAINING, VALIDATION, Phase

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["ProgressBar"]

_NEVER = float("inf")


class ProgressBar(Callback):
    """Shows training progress: animated on a terminal, one plain line per phase elsewhere.

    Args:
        console: the rich ``Console`` to draw on; by default a new one on standard
            output. Whether it is interactive (``console.is_interactive``, or
            Jupyter) is decided when each ``fit`` starts.
        refresh_per_second: the most redraws per second; metric values are read
            only at a redraw, so this also bounds the device synchronisations.

    Each phase end prints, in both modes, a line such as::

        epoch 1/3 training: 150 batches in 1.2s (125.0 batches/s) - loss 0.3412 - accuracy 0.91

    Epochs are counted from 1 here, for people; the logs count from 0. Under
    ``torch.distributed`` only the main process (``loop.is_main_process``) draws.
    """

    def __init__(self, console: Console | None = None, *, refresh_per_second: float = 10.0) -> None:
        if isinstance(refresh_per_second, bool) or not (
            isinstance(refresh_per_second, int | float) and refresh_per_second > 0
        ):
            raise ConfigError(
                f"refresh_per_second must be a number > 0; got {refresh_per_second!r}."
            )
        self.console = console if console is not None else Console()
        self._interval = 1.0 / refresh_per_second
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._results = PhaseResults()
        self._active = True
        self._phase_start = 0.0
        self._next_refresh = _NEVER

    # -- fit scope -------------------------------------------------------------------

    def on_fit_start(self, loop: LoopView) -> None:
        """Start the live display when the console is interactive (main process only)."""
        self._stop_display()
        self._active = loop.is_main_process
        if self._active and self._live():
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[metrics]}", markup=False),
                console=self.console,
                auto_refresh=False,
                transient=True,
            )
            self._progress.start()

    def on_fit_end(self, loop: LoopView) -> None:
        """Stop the live display (also after a stop or a failure), restoring the terminal."""
        self._stop_display()

    # -- phase scope -----------------------------------------------------------------

    def on_training_start(self, loop: LoopView) -> None:
        """Open the training phase's bar."""
        self._open(loop, TRAINING)

    def on_validation_start(self, loop: LoopView) -> None:
        """Open the validation phase's bar."""
        self._open(loop, VALIDATION)

    @property
    def on_batch_end(self) -> Callable[[LoopView], None] | None:
        """The per-batch hook where a live display can redraw; ``None`` elsewhere.

        Read once when a ``fit`` starts (hooks are collected then), so off a terminal
        the loop never calls this callback per batch.
        """
        return self._tick if self._live() else None

    def _tick(self, loop: LoopView) -> None:
        """Redraw when a refresh is due."""
        now = monotonic()
        if now >= self._next_refresh:
            self._refresh(loop, now)

    def on_training_end(self, loop: LoopView) -> None:
        """Print the training phase's summary line."""
        self._close(loop, TRAINING)

    def on_validation_end(self, loop: LoopView) -> None:
        """Print the validation phase's summary line."""
        self._close(loop, VALIDATION)

    # -- work ------------------------------------------------------------------------

    def _live(self) -> bool:
        return bool(self.console.is_interactive or self.console.is_jupyter)

    def _describe(self, loop: LoopView, phase: Phase) -> str:
        return f"epoch {loop.epoch_index + 1}/{loop.epoch_count} {phase}"

    def _open(self, loop: LoopView, phase: Phase) -> None:
        if not self._active:
            return
        self._results.opened(loop, phase)
        self._phase_start = monotonic()
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            self._describe(loop, phase), total=loop.batch_count, rate="", metrics=""
        )
        self._next_refresh = self._phase_start  # draw the new bar at the first batch

    def _refresh(self, loop: LoopView, now: float) -> None:
        self._next_refresh = now + self._interval
        if self._progress is None or self._task is None:
            return
        elapsed = now - self._phase_start
        rate = f"{loop.batches_run / elapsed:.1f} batches/s" if elapsed > 0 else ""
        metrics = " - ".join(f"{name} {format_value(v)}" for name, v in loop.metrics.items())
        self._progress.update(
            self._task, completed=loop.batch_index + 1, rate=rate, metrics=metrics
        )
        self._progress.refresh()

    def _close(self, loop: LoopView, phase: Phase) -> None:
        if not self._active:
            return
        elapsed = monotonic() - self._phase_start
        values = self._results.closed(loop, phase) or {}
        batches = loop.batches_run
        parts = [
            f"{self._describe(loop, phase)}: {batches} batches in {elapsed:.1f}s"
            + (f" ({batches / elapsed:.1f} batches/s)" if elapsed > 0 else ""),
            *(f"{name} {format_value(value)}" for name, value in values.items()),
        ]
        line = " - ".join(parts)
        if loop.failure is not None:
            line += f" (interrupted by {type(loop.failure).__name__})"
        elif loop.stop_reason is not None:
            line += f" (stopped: {loop.stop_reason})"
        self._next_refresh = _NEVER
        if self._progress is None:
            # Plain text to a file or pipe: rich's renderer would only add cost.
            self.console.file.write(line + "\n")
            self.console.file.flush()
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._progress.refresh()

    def _stop_display(self) -> None:
        self._next_refresh = _NEVER
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None

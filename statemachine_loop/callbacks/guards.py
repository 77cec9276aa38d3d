"""Guards that end or skip work: ``TerminateOnNaN`` and ``StopAfter``.

Both decide *before* the machine moves, with the decisions of the lifecycle
contract, and every decision lands in ``loop.decisions`` with its reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from statemachine_loop.callback import Callback
from statemachine_loop.decisions import Redirect, Stop, Veto
from statemachine_loop.errors import ConfigError
from statemachine_loop.events import Event

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["StopAfter", "TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """Keep a non-finite training loss from reaching the weights.

    A guard on ``update_start`` (after backward, before ``optimizer.step()``): when
    ``loop.last_step_loss`` is ``nan`` or ``inf`` it vetoes the update, with a reason
    naming the epoch, the batch and the value. Then:

    * ``action="stop"`` (default): the fit stops at that batch's ``batch_end`` (a
      ``Stop`` on a scope end, so the end is taken first). Stopping one event later
      than the veto lets the batch's loss reach the metrics, so the phase's
      ``loss`` in ``loop.history`` and the logs shows the ``nan``; a ``Stop`` at
      ``update_start`` itself would skip the batch's metric update and hide it.
    * ``action="skip"``: the update is skipped and the batch's gradients are dropped
      (``zero_grad``: they are non-finite, and a vetoed update otherwise keeps them;
      with gradient accumulation the group's earlier batches go with them, as
      backward already summed the ``nan`` into them); training goes on and
      ``skipped`` counts such batches. The loss metric still averages the ``nan``.

    Reading the loss's finiteness synchronises with the device once per training
    batch.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop") -> None:
        if action not in ("stop", "skip"):
            raise ConfigError(f"TerminateOnNaN action must be 'stop' or 'skip'; got {action!r}.")
        self.action = action
        #: Updates skipped for a non-finite loss in the latest fit (``action="skip"``).
        self.skipped = 0
        self._stopping: str | None = None
        if action == "skip":
            self.guard_batch_end = None  # type: ignore[method-assign, assignment]

    def on_fit_start(self, loop: LoopView) -> None:
        """Forget the previous fit's count."""
        self.skipped = 0
        self._stopping = None

    def guard_update_start(self, loop: LoopView) -> Veto | None:
        """Veto the update when the batch's loss is not finite."""
        loss = loop.last_step_loss
        if loss is None or bool(torch.isfinite(loss)):
            return None
        where = f"epoch {loop.epoch_index}, batch {loop.batch_index}"
        found = f"TerminateOnNaN: non-finite loss {float(loss.detach())} at {where}"
        if self.action == "skip":
            # Safe in a guard: whoever else decides, a vetoed update is not taken.
            loop.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return Veto(f"{found}; update skipped and its gradients dropped")
        self._stopping = found
        return Veto(f"{found}; no update, the fit stops at this batch's end")

    def guard_batch_end(self, loop: LoopView) -> Stop | None:
        """Stop at the end of the batch whose loss was not finite (``action="stop"``)."""
        if self._stopping is None:
            return None
        reason, self._stopping = self._stopping, None
        return Stop(reason)


class StopAfter(Callback):
    """End training after ``steps`` optimizer steps or ``seconds`` of wall time.

    ``steps`` counts updates actually taken (``update_start`` not vetoed);
    ``seconds`` counts from ``fit_start`` (``clock`` is ``time.monotonic``; tests may
    pass another). Give either or both; the first limit reached wins.

    When a limit is reached the next training ``batch_start`` is redirected to
    ``training_end``: the phase closes normally (its history entry covers the
    batches that ran), validation of the current epoch still runs, and the
    ``epoch_end`` guard then returns ``Stop``, which closes the epoch and winds down
    to ``fit_end``. A limit reached exactly at an epoch's last batch stops at that
    epoch's end, unless it was the last epoch anyway. ``state_dict`` keeps the steps
    taken and the seconds elapsed, so a resumed fit counts on from them.
    """

    def __init__(
        self,
        steps: int | None = None,
        seconds: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if steps is None and seconds is None:
            raise ConfigError("StopAfter needs steps=..., seconds=... or both; got neither.")
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ConfigError(f"StopAfter steps must be an int >= 1; got {steps!r}.")
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ConfigError(f"StopAfter seconds must be a positive number; got {seconds!r}.")
        self.steps = steps
        self.seconds = seconds
        self._clock = clock
        #: Optimizer steps taken so far in this fit (and the fits it resumed).
        self.steps_taken = 0
        self._elapsed_before = 0.0
        self._started: float | None = None  # None outside a fit
        self._cut_epoch: int | None = None
        if steps is None:
            self.on_update_start = None  # type: ignore[method-assign, assignment]

    @property
    def elapsed(self) -> float:
        """Seconds of this fit so far (plus those of the fits it resumed)."""
        if self._started is None:
            return self._elapsed_before
        return self._elapsed_before + self._clock() - self._started

    def on_fit_start(self, loop: LoopView) -> None:
        """Start the clock; counters start afresh unless the fit resumes."""
        if not loop.resuming:
            self.steps_taken = 0
            self._elapsed_before = 0.0
        self._cut_epoch = None
        self._started = self._clock()

    def on_update_start(self, loop: LoopView) -> None:
        """Count a taken update."""
        self.steps_taken += 1

    def _reached(self) -> str | None:
        if self.steps is not None and self.steps_taken >= self.steps:
            return f"StopAfter: {self.steps_taken} optimizer steps taken (limit {self.steps})"
        if self.seconds is not None:
            elapsed = self.elapsed
            if elapsed >= self.seconds:
                return f"StopAfter: {elapsed:.3g} s elapsed (limit {self.seconds:g} s)"
        return None

    def guard_batch_start(self, loop: LoopView) -> Redirect | None:
        """Close the training phase instead of starting another batch once a limit is reached."""
        if not loop.is_training:
            return None
        reason = self._reached()
        if reason is None:
            return None
        self._cut_epoch = loop.epoch_index
        return Redirect(Event.TRAINING_END, f"{reason}; closing the training phase")

    def guard_epoch_end(self, loop: LoopView) -> Stop | None:
        """Stop once the epoch in which a limit was reached has closed."""
        cut = self._cut_epoch == loop.epoch_index
        if not cut and loop.epoch_index + 1 >= loop.epoch_count:
            return None
        reason = self._reached()
        if reason is None:
            return None
        return Stop(f"{reason}; stopping at the end of epoch {loop.epoch_index}")

    def on_fit_end(self, loop: LoopView) -> None:
        """Stop the clock."""
        self._elapsed_before, self._started = self.elapsed, None

    def state_dict(self) -> dict[str, Any]:
        """Steps taken and seconds elapsed so far."""
        return {"steps_taken": self.steps_taken, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the clock goes on from the saved seconds."""
        self.steps_taken = int(state["steps_taken"])
        self._elapsed_before = float(state["elapsed"])

"""``Checkpoint``: save the loop's state on a schedule and when the job is preempted.

Checkpoints are written atomically with a checksum (:mod:`statemachine_loop.checkpoint_io`)
and hold ``loop.state_dict()``: enough for ``fit(resume=...)`` to continue exactly,
mid-epoch included. The callback runs last (``runs_last``), so the state it saves
includes every other callback's work on the same event.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from statemachine_loop.callback import Callback
from statemachine_loop.callbacks._phases import parse_monitor
from statemachine_loop.checkpoint_io import (
    CheckpointInfo,
    delete_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from statemachine_loop.decisions import DecisionKind, Stop
from statemachine_loop.errors import ConfigError
from statemachine_loop.events import TRAINING, Event
from statemachine_loop.machine import BETWEEN_EPOCHS
from statemachine_loop.preemption import PreemptionHandler

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["Checkpoint"]


def _positive(name: str, value: int | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}.")


class Checkpoint(Callback):
    """Save checkpoints every ``every_n_epochs`` epochs and/or ``every_n_batches`` batches.

    Args:
        directory: where checkpoints go (created on the first save).
        every_n_epochs: save at every n-th ``epoch_end``; ``None`` never.
        every_n_batches: save after every n-th training batch; ``None`` never.
        keep_last: how many of the newest checkpoints to keep.
        monitor: ``"<phase>/<metric>"`` (e.g. ``"validation/loss"``) to also keep the
            ``keep_best`` best epoch checkpoints, whatever their age.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        handle_preemption: on SIGTERM/SIGINT, stop at the next batch boundary (the
            next ``batch_end`` or ``epoch_end``) with ``Stop("preempted")`` after
            writing a checkpoint; a second SIGINT aborts at once.
    """

    runs_last: ClassVar[bool] = True

    def __init__(
        self,
        directory: str | Path = "run/checkpoints",
        every_n_epochs: int | None = 1,
        every_n_batches: int | None = None,
        keep_last: int = 3,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        handle_preemption: bool = True,
    ) -> None:
        _positive("every_n_epochs", every_n_epochs, optional=True)
        _positive("every_n_batches", every_n_batches, optional=True)
        _positive("keep_last", keep_last, optional=False)
        _positive("keep_best", keep_best, optional=False)
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max'; got {mode!r}.")
        self._monitored_metric = None if monitor is None else parse_monitor("Checkpoint", monitor)
        self.directory = Path(directory)
        self.every_n_epochs = every_n_epochs
        self.every_n_batches = every_n_batches
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best
        self.preemption = PreemptionHandler()
        #: The checkpoints this callback wrote in this process, oldest first.
        self.saved: list[CheckpointInfo] = []
        self._saves = 0
        self._training_batches = 0
        if every_n_batches is None and not handle_preemption:
            self.on_batch_end = None  # type: ignore[assignment]
        self._handle_preemption = handle_preemption

    def state_dict(self) -> dict[str, Any]:
        """Counters that keep checkpoint numbering and batch schedules going on resume."""
        return {"saves": self._saves, "training_batches": self._training_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self._saves = int(state["saves"])
        self._training_batches = int(state["training_batches"])

    def on_fit_start(self, loop: LoopView) -> None:
        """Install the preemption handlers for the duration of the fit."""
        if self._handle_preemption:
            self.preemption.install()

    def on_fit_end(self, loop: LoopView) -> None:
        """Restore the previous signal handlers."""
        self.preemption.uninstall()

    def on_batch_end(self, loop: LoopView) -> Stop | None:
        """After a preemption signal, checkpoint and stop; else save every n-th training batch.

        A ``batch_end`` observer is an exact boundary: the next batch has not been
        fetched, so the resumed run draws the same random numbers from here on.
        """
        if loop.stop_reason is not None or loop.failure is not None:
            return None
        if self._preempted(loop):
            return self._save_and_stop(loop)
        if loop.is_training and self.every_n_batches is not None:
            self._training_batches += 1
            if self._training_batches % self.every_n_batches == 0:
                self.save(loop, reason="schedule")
        return None

    def on_epoch_end(self, loop: LoopView) -> Stop | None:
        """After a preemption signal, checkpoint and stop; else save every n-th epoch.

        An epoch that a stop decided at this ``epoch_end`` ends (``EarlyStopping``) is
        saved too, with the stop, so ``resume="auto"`` from it stops as the run did
        instead of training on. Epochs closed by a wind-down are not saved.
        """
        if loop.failure is not None:
            return None
        if loop.stop_reason is not None:
            if _stopped_at_this_epoch_end(loop) and self.every_n_epochs:
                self.save(loop, reason="stopped")
            return None
        if self._preempted(loop):
            return self._save_and_stop(loop)
        if self.every_n_epochs and (loop.epoch_index + 1) % self.every_n_epochs == 0:
            self.save(loop, reason="schedule")
        return None

    def _preempted(self, loop: LoopView) -> bool:
        if not self._handle_preemption:
            return False
        requested = self.preemption.requested is not None
        if loop.collective is not None:  # every rank calls this observer: agree first
            requested = loop.collective.any(requested)
        return requested

    def _save_and_stop(self, loop: LoopView) -> Stop:
        self.save(loop, reason="preempted")
        return Stop("preempted")

    def save(self, loop: LoopView, *, reason: str = "manual") -> CheckpointInfo | None:
        """Write a checkpoint of ``loop`` now, then drop the ones no longer kept.

        Under ``torch.distributed`` every rank must call it at the same point (the
        schedules guarantee that): the state of all ranks is gathered and rank 0
        alone writes; the others return ``None``.
        """
        self._saves += 1
        state = loop.state_dict()
        if not loop.is_main_process:
            return None
        position = f"e{loop.epoch_index:04d}-{loop.state}-b{loop.batch_index:06d}"
        metadata: dict[str, Any] = {
            "epoch_index": loop.epoch_index,
            "batch_index": loop.batch_index,
            "state": loop.state,
            "reason": reason,
            "monitor": self.monitor,
            "monitor_value": self._monitored(loop),
        }
        info = save_checkpoint(
            self.directory,
            f"checkpoint-{self._saves:06d}-{position}",
            state,
            step=self._saves,
            metadata=metadata,
        )
        self.saved.append(info)
        self._rotate()
        return info

    def _monitored(self, loop: LoopView) -> float | None:
        if self._monitored_metric is None or loop.state != BETWEEN_EPOCHS:
            return None
        phase, name = self._monitored_metric
        entries = loop.history.training if phase == TRAINING else loop.history.validation
        if not entries or entries[-1]["epoch"] != loop.epoch_index:
            return None
        if name not in entries[-1]:
            raise ConfigError(
                f"Checkpoint monitors {self.monitor!r} but the {phase} metrics are "
                f"{sorted(k for k in entries[-1] if k != 'epoch')}."
            )
        value = float(entries[-1][name])
        return value if math.isfinite(value) else None

    def _rotate(self) -> None:
        checkpoints = list_checkpoints(self.directory)
        scored = [c for c in checkpoints if c.metadata.get("monitor_value") is not None]
        scored.sort(key=lambda c: float(c.metadata["monitor_value"]), reverse=self.mode == "max")
        keep = {id(c) for c in scored[: self.keep_best]} if self.monitor else set()
        keep |= {id(c) for c in checkpoints[-self.keep_last :]}
        for checkpoint in checkpoints:
            if id(checkpoint) not in keep:
                delete_checkpoint(checkpoint)


def _stopped_at_this_epoch_end(loop: LoopView) -> bool:
    """Whether the stop was decided on this very ``epoch_end`` (not an earlier event)."""
    for record in reversed(loop.decisions):
        if record.event is not Event.EPOCH_END or record.epoch_index != loop.epoch_index:
            return False
        if record.kind is DecisionKind.STOP and record.applied:
            return True
    return False

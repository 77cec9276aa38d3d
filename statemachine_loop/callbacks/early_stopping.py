"""``EarlyStopping``: stop the fit when a monitored phase metric stops improving.

It decides at ``epoch_end`` as an *observer*: the epoch has closed, its phases'
final values are in ``loop.history``, and a ``Stop`` returned there winds the loop
down straight to ``fit_end``, where the best weights are put back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from statemachine_loop.callback import Callback
from statemachine_loop.callbacks._phases import parse_monitor
from statemachine_loop.decisions import Stop
from statemachine_loop.errors import ConfigError
from statemachine_loop.events import PHASES, TRAINING, VALIDATION
from statemachine_loop.models import unwrap

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs; keep the best weights.

    ``monitor`` is ``"<phase>/<metric>"``, the phase ``training`` or ``validation`` and
    the metric a name the loop tracks (``"validation/loss"``,
    ``"validation/accuracy"``). An epoch *improves* when its value beats the best so
    far by more than ``min_delta`` (lower with ``mode="min"``, higher with ``"max"``);
    ``nan`` never improves. After ``patience`` epochs in a row without improvement
    the ``epoch_end`` observer returns ``Stop`` with a reason naming the metric, the
    best value and its epoch (``patience=0`` stops at the first epoch that does not
    improve). It never stops after the last epoch, where there is nothing left to
    save.

    Only a phase that ran to its end counts: an epoch whose monitored phase was
    skipped, or cut short by a stop, is ignored. With ``restore_best`` the model's
    weights are copied (to the CPU) at each improvement and loaded back at
    ``fit_end``, unless the fit failed with an exception. An unknown metric is a
    :class:`~statemachine_loop.ConfigError` before anything runs, naming the metrics
    that exist; monitoring ``validation`` on a loop without validation data is one at
    the end of the first epoch. ``state_dict`` holds the best value, its epoch, the
    epochs waited and the best weights, so a resumed fit goes on counting.
    """

    def __init__(
        self,
        monitor: str = "validation/loss",
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best: bool = True,
    ) -> None:
        phase, metric = parse_monitor("EarlyStopping", monitor)
        if mode not in ("min", "max"):
            raise ConfigError(f"EarlyStopping mode must be 'min' or 'max'; got {mode!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"EarlyStopping patience must be an int >= 0; got {patience!r}.")
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, int | float)
            or not min_delta >= 0
            or math.isinf(min_delta)
        ):
            raise ConfigError(
                f"EarlyStopping min_delta must be a finite number >= 0; got {min_delta!r}."
            )
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self._phase = phase
        self._metric = metric
        #: The best value seen, and the epoch it was seen at (``None`` before the first).
        self.best: float | None = None
        self.best_epoch: int | None = None
        #: Epochs in a row without improvement.
        self.wait = 0
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._complete_epoch: dict[str, int] = {}
        self._validation_proposed = False

    def guard_fit_start(self, loop: LoopView) -> None:
        """Refuse, before anything runs, a metric the loop does not track."""
        names = list(loop.metrics)
        if self._metric not in names:
            existing = ", ".join(f"'{phase}/{name}'" for phase in PHASES for name in names)
            raise ConfigError(
                f"EarlyStopping monitors {self.monitor!r}, but the loop tracks no metric "
                f"named {self._metric!r}; the monitors that exist are {existing}."
            )

    def on_fit_start(self, loop: LoopView) -> None:
        """Start counting afresh, unless the fit resumes from a checkpoint."""
        self._complete_epoch = {}
        self._validation_proposed = False
        if not loop.resuming:
            self.best = self.best_epoch = None
            self.wait = 0
            self._best_weights = None

    def guard_validation_start(self, loop: LoopView) -> None:
        """Note that the loop has validation data (it proposes this event only then)."""
        self._validation_proposed = True

    def guard_training_end(self, loop: LoopView) -> None:
        """Note whether the training phase is closing normally (not in a wind-down)."""
        self._closing(loop, TRAINING)

    def guard_validation_end(self, loop: LoopView) -> None:
        """Note whether the validation phase is closing normally (not in a wind-down)."""
        self._closing(loop, VALIDATION)

    def _closing(self, loop: LoopView, phase: str) -> None:
        # Guards of an end proposed by the wind-down already see stop_reason set.
        if loop.stop_reason is None and loop.failure is None:
            self._complete_epoch[phase] = loop.epoch_index

    def on_epoch_end(self, loop: LoopView) -> Stop | None:
        """Compare this epoch's value with the best; stop after ``patience`` epochs without gain."""
        epoch = loop.epoch_index
        if loop.failure is not None:
            return None
        if self._complete_epoch.get(self._phase) != epoch:
            self._check_validation_exists(loop, epoch)
            return None
        entries = getattr(loop.history, self._phase)
        if not entries or entries[-1].get("epoch") != epoch:
            return None  # the phase closed without running a batch
        value = float(entries[-1][self._metric])
        if self._improves(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best and loop.model is not None:
                self._best_weights = {
                    key: tensor.detach().to("cpu", copy=True)
                    for key, tensor in unwrap(loop.model).state_dict().items()
                }
            return None
        self.wait += 1
        if self.wait < max(self.patience, 1) or loop.stop_reason is not None:
            return None
        if epoch + 1 >= loop.epoch_count:
            return None
        return Stop(
            f"EarlyStopping: {self.monitor} did not improve on its best {self.best:.6g} "
            f"(epoch {self.best_epoch}) by more than min_delta={self.min_delta:g} for "
            f"{self.wait} epoch(s) (patience {self.patience}); epoch {epoch} gave {value:.6g}."
        )

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _check_validation_exists(self, loop: LoopView, epoch: int) -> None:
        trained = self._complete_epoch.get(TRAINING) == epoch
        if self._phase == VALIDATION and trained and not self._validation_proposed:
            raise ConfigError(
                f"EarlyStopping monitors {self.monitor!r}, but the loop has no validation "
                "data; give TrainingLoop(validation=...) or monitor a 'training/...' metric."
            )

    def on_fit_end(self, loop: LoopView) -> None:
        """Load the best weights back into the model (not after a failure)."""
        if (
            self.restore_best
            and self._best_weights is not None
            and loop.failure is None
            and loop.model is not None
        ):
            unwrap(loop.model).load_state_dict(self._best_weights)

    def state_dict(self) -> dict[str, Any]:
        """Best value, its epoch, epochs waited, the best weights, and which phases of
        the current epoch already completed (a checkpoint may fall between them)."""
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "best_weights": self._best_weights,
            "complete_epoch": dict(self._complete_epoch),
            "validation_proposed": self._validation_proposed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.wait = int(state["wait"])
        weights = state["best_weights"]
        self._best_weights = None if weights is None else dict(weights)
        self._complete_epoch = {str(k): int(v) for k, v in state["complete_epoch"].items()}
        self._validation_proposed = bool(state["validation_proposed"])

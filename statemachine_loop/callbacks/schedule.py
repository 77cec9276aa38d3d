"""``LearningRateScheduler``: set the optimizer's rate from a ``Schedule``, step by step.

An observer of ``batch_start`` (training batches only) or ``epoch_start``: it acts
once the machine has taken the event and before the work that follows, so the rate
it sets is the one the batch's (or epoch's) updates use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from statemachine_loop.callback import Callback
from statemachine_loop.callbacks.gradients import GradientAccumulation
from statemachine_loop.errors import ConfigError
from statemachine_loop.schedules import Schedule, adam_bias_correction

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["LearningRateScheduler"]

_STEP_HOOKS = ("on_training_start", "on_batch_start", "on_training_end")


class LearningRateScheduler(Callback):
    """Set every param group's learning rate from ``schedule``, per step or per epoch.

    ``per="step"``: step ``t`` is the ``t``-th optimizer update the fit schedules,
    counting from 0; with gradient accumulation of ``k`` batches, each group of ``k``
    training batches (and a final partial group) is one step. The rate is set at each
    training ``batch_start``, so all batches of a group see their step's rate. An open
    schedule is filled up to ``epochs * ceil(batches per epoch / k)`` steps at the
    first ``training_start`` (when ``batch_count`` is known); ``k`` is
    ``accumulation`` if given, else the ``steps`` of a
    :class:`~statemachine_loop.callbacks.gradients.GradientAccumulation` in
    ``loop.callbacks``, else 1 (pass ``accumulation=`` when that callback is given to
    ``fit(callbacks=...)`` only). Epochs skipped by a veto do not advance the step.

    ``per="epoch"``: step ``t`` is epoch ``t``; the rate is set at ``epoch_start`` and an
    open schedule is filled up to the fit's ``epochs``.

    A schedule shorter than the fit is a :class:`~statemachine_loop.ConfigError` when
    the length is known, and otherwise at the first step past its end.
    ``bias_correction=(beta1, beta2)`` multiplies the rate by
    :func:`~statemachine_loop.schedules.adam_bias_correction` (only for optimizers
    that do not correct it themselves; torch's Adam does). ``lr`` is the rate last set.
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        per: Literal["step", "epoch"] = "step",
        accumulation: int | None = None,
        bias_correction: tuple[float, float] | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise ConfigError(
                f"LearningRateScheduler needs a Schedule; got {type(schedule).__name__}."
            )
        if per not in ("step", "epoch"):
            raise ConfigError(f"per must be 'step' or 'epoch'; got {per!r}.")
        if accumulation is not None and (
            isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1
        ):
            raise ConfigError(f"accumulation must be an int >= 1 or None; got {accumulation!r}.")
        if bias_correction is not None:
            adam_bias_correction(0, bias_correction)  # validates the betas
        self.schedule = schedule
        self.per = per
        self.accumulation = accumulation
        self.bias_correction = bias_correction
        #: The rate most recently set on the optimizer.
        self.lr: float | None = None
        self._active: Schedule | None = None
        self._group = 1
        self._steps_before_epoch = 0
        disabled = ("on_epoch_start",) if per == "step" else _STEP_HOOKS
        for hook in disabled:
            setattr(self, hook, None)  # the hot path skips hooks that are None

    def on_fit_start(self, loop: LoopView) -> None:
        """Work out the accumulation and, per epoch, the schedule's length."""
        self._active = None
        if not loop.resuming:
            self._steps_before_epoch = 0
        self._group = self.accumulation or next(
            (cb.steps for cb in loop.callbacks if isinstance(cb, GradientAccumulation)), 1
        )
        if self.per == "epoch":
            self._active = self._fitted(loop.epoch_count, f"{loop.epoch_count} epochs")

    def on_epoch_start(self, loop: LoopView) -> None:
        """Per epoch: set the epoch's rate."""
        self._apply(loop, loop.epoch_index)

    def on_training_start(self, loop: LoopView) -> None:
        """Per step: fill the schedule from the fit's length, once the batch count is known."""
        if self._active is not None:
            return
        count = loop.batch_count
        if count is None:
            self._active = self._fitted(None, "training data without len()")
            return
        per_epoch = math.ceil(count / self._group)
        self._active = self._fitted(
            loop.epoch_count * per_epoch,
            f"{loop.epoch_count} epochs x {per_epoch} steps "
            f"({count} batches, {self._group} per step)",
        )

    def on_batch_start(self, loop: LoopView) -> None:
        """Per step: set the rate of this training batch's step."""
        if loop.is_training:
            self._apply(loop, self._steps_before_epoch + loop.batch_index // self._group)

    def on_training_end(self, loop: LoopView) -> None:
        """Per step: count the steps of the phase that closed."""
        self._steps_before_epoch += math.ceil((loop.batch_index + 1) / self._group)

    def _fitted(self, total: int | None, described: str) -> Schedule:
        schedule = self.schedule
        length = schedule.total_steps
        if length is None:
            if total is None:
                raise ConfigError(
                    f"The schedule's last segment has no steps and the fit's length is "
                    f"unknown ({described}); give the Schedule total_steps=..."
                )
            try:
                return schedule.with_total_steps(total)
            except ConfigError as error:
                raise ConfigError(
                    f"The schedule cannot be fitted to this fit's {total} steps "
                    f"({described}): {error}"
                ) from error
        if total is not None and length < total:
            raise ConfigError(
                f"The schedule covers {length} steps but the fit takes {total} "
                f"({described}); lengthen the schedule or leave its last segment's steps "
                "out so it fills the fit."
            )
        return schedule

    def _apply(self, loop: LoopView, step: int) -> None:
        assert self._active is not None
        lr = self._active(step)
        if self.bias_correction is not None:
            lr *= adam_bias_correction(step, self.bias_correction)
        for group in loop.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.lr = lr

    def state_dict(self) -> dict[str, Any]:
        """The optimizer steps of the epochs already finished."""
        return {"steps_before_epoch": self._steps_before_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._steps_before_epoch = int(state["steps_before_epoch"])

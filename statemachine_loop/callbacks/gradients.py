"""Gradient accumulation and clipping, as hooks on ``update_start``.

:class:`GradientAccumulation` is a *guard*: it vetoes ``update_start`` on all but the
last batch of each group, and the contract keeps the gradients of a vetoed update,
so they add up. :class:`GradientClipping` is an *observer*: it runs only once the
machine has taken ``update_start``, so it clips exactly the updates that happen,
never the partial sums in between.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from statemachine_loop.callback import Callback
from statemachine_loop.decisions import Veto
from statemachine_loop.errors import ConfigError
from statemachine_loop.step import Step

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["GradientAccumulation", "GradientClipping"]

_BATCH_SIZE = Step().batch_size
_ACCUMULATION_HOOKS = (
    "on_fit_start",
    "on_training_start",
    "on_batch_start",
    "guard_update_start",
    "on_update_start",
    "on_training_end",
)


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class GradientAccumulation(Callback):
    """Take one optimizer step per ``steps`` training batches, as one batch that many times larger.

    Vetoes ``update_start`` except on every ``steps``-th batch of the training phase
    and on its last batch (so a final partial group is applied, not dropped). The
    gradients are kept as the *sample-weighted mean* of the group's batches: with a
    mean-reduced loss, ``k`` accumulated batches step exactly like one batch of all
    their samples (up to rounding), also when the batches differ in size or the last
    group is short. Batch sizes are read as the default ``Step.batch_size`` does.

    How: between batches the gradient buffer holds ``S / D`` for the weighted sum
    ``S``; the ``batch_start`` observer rescales it to ``S / n`` for the new batch of
    ``n`` samples (a no-op when sizes are equal), backward adds that batch's mean
    gradient, and the guard rescales to ``S' / N`` over the group's ``N`` samples on
    the batch that is to update. So the gradient is already a mean when clipping or
    ``optimizer.step()`` sees it, whatever order the callbacks are in: one foreach
    multiply per group in the common case.

    If the training data has no ``len()`` the last batch cannot be known; gradients
    of a final partial group are then discarded (zeroed at the next
    ``training_start``) and a warning says so. ``LearningRateScheduler`` finds this
    callback in ``loop.callbacks`` to count optimizer steps.
    """

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"GradientAccumulation steps must be an int >= 1; got {steps!r}.")
        self.steps = steps
        self._samples = 0  # samples whose gradients the buffer holds
        self._divisor = 0  # the buffer holds their weighted sum divided by this
        self._batch_size = 0
        self._parameters: list[torch.Tensor] = []
        if steps == 1:  # nothing to accumulate: hook nothing (the hot path skips None hooks)
            for hook in _ACCUMULATION_HOOKS:
                setattr(self, hook, None)

    def on_fit_start(self, loop: LoopView) -> None:
        """Find the parameters the optimizer updates, once per fit."""
        self._parameters = _parameters(loop.optimizer)
        if not loop.resuming:
            self._samples = self._divisor = 0

    def on_training_start(self, loop: LoopView) -> None:
        """The loop zeroed the gradients: a new group begins."""
        if not loop.resuming:
            self._samples = self._divisor = 0

    def on_batch_start(self, loop: LoopView) -> None:
        """Rescale the kept gradient sum so the next backward adds with the right weight."""
        if not loop.is_training:
            return
        size = self._batch_size = _BATCH_SIZE(loop.last_step_input, loop.last_step_target)
        if not self._samples:
            return
        grads = self._grads()
        if not grads:  # someone zeroed them (an update, or a skipped non-finite loss)
            self._samples = self._divisor = 0
        elif self._divisor != size:
            torch._foreach_mul_(grads, self._divisor / size)

    def guard_update_start(self, loop: LoopView) -> Veto | None:
        """Veto the update unless this batch closes a group or the phase."""
        size = self._batch_size
        samples = self._samples = self._samples + size
        self._divisor = size
        index, count = loop.batch_index, loop.batch_count
        closes = (index + 1) % self.steps == 0 or (count is not None and index == count - 1)
        if not closes:
            return Veto(
                f"accumulating gradients: batch {index % self.steps + 1} of {self.steps} "
                "in this update"
            )
        if samples != size:
            grads = self._grads()
            if grads:
                torch._foreach_mul_(grads, size / samples)
            self._divisor = samples
        return None

    def on_update_start(self, loop: LoopView) -> None:
        """The update is taken; ``zero_grad`` follows, so the next group starts empty."""
        self._samples = self._divisor = 0

    def on_training_end(self, loop: LoopView) -> None:
        """Warn when a final partial group could not be applied (data without ``len()``)."""
        if self._samples and loop.batch_count is None and loop.stop_reason is None:
            warnings.warn(
                f"GradientAccumulation({self.steps}): the training data has no len(), so "
                f"the gradients of the last {self._samples} samples of epoch "
                f"{loop.epoch_index} were not applied; they are discarded at the next "
                "training_start.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._parameters if p.grad is not None]

    def state_dict(self) -> dict[str, Any]:
        """The scaling state of a group in progress (meaningful only with saved gradients)."""
        return {"samples": self._samples, "divisor": self._divisor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._samples = int(state["samples"])
        self._divisor = int(state["divisor"])


class GradientClipping(Callback):
    """Clip gradients just before each ``optimizer.step()`` that is taken.

    Give exactly one of ``max_norm`` (rescale all gradients together so their
    ``norm_type``-norm is at most ``max_norm``: ``torch.nn.utils.clip_grad_norm_``) or
    ``max_value`` (clamp each element to ``[-max_value, max_value]``:
    ``clip_grad_value_``). When ``loop.grad_scaler`` is set (float16 mixed
    precision) the gradients are unscaled first, so the limit applies to the true
    gradients. ``last_norm`` holds the total norm before clipping of the latest
    clipped update (a tensor, read it without forcing a sync on every batch).
    """

    def __init__(
        self,
        max_norm: float | None = None,
        *,
        max_value: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        if (max_norm is None) == (max_value is None):
            raise ConfigError(
                "GradientClipping needs exactly one of max_norm and max_value; got "
                f"max_norm={max_norm!r}, max_value={max_value!r}."
            )
        for name, value in (("max_norm", max_norm), ("max_value", max_value)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(
                    f"GradientClipping {name} must be a positive finite number; got {value!r}."
                )
        self.max_norm = None if max_norm is None else float(max_norm)
        self.max_value = None if max_value is None else float(max_value)
        self.norm_type = float(norm_type)
        self.last_norm: torch.Tensor | None = None
        self._parameters: list[torch.Tensor] = []

    def on_fit_start(self, loop: LoopView) -> None:
        """Find the parameters the optimizer updates, once per fit."""
        self._parameters = _parameters(loop.optimizer)

    def on_update_start(self, loop: LoopView) -> None:
        """Unscale (with a grad scaler) and clip, before the step."""
        if loop.grad_scaler is not None:
            loop.grad_scaler.unscale_(loop.optimizer)
        if self.max_norm is not None:
            self.last_norm = torch.nn.utils.clip_grad_norm_(
                self._parameters, self.max_norm, self.norm_type
            )
        else:
            assert self.max_value is not None
            torch.nn.utils.clip_grad_value_(self._parameters, self.max_value)

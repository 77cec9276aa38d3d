"""``LoopView``: what a hook may read from the loop, and the two things it may set.

Callbacks, the testing kit and the engines type against this protocol rather than the
concrete ``TrainingLoop``: a hook is handed the loop, but all it may rely on is
listed here, and the modules that define hooks never need to import the loop itself,
so the package's import graph stays a tree. ``TrainingLoop`` satisfies it; so can a
stand-in a user builds to unit-test a callback without a fit.

Everything is read-only except :attr:`LoopView.autocast` and
:attr:`LoopView.grad_scaler`, the extension points a mixed-precision callback sets.
The values belong to the current fit (or the last one, after it returned or raised)
and are created fresh when the next ``fit`` starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from transitions import Machine

    from statemachine_loop.decisions import DecisionRecord
    from statemachine_loop.distributed import Collective
    from statemachine_loop.history import History
    from statemachine_loop.precision import AutocastFactory
    from statemachine_loop.step import Step

__all__ = ["LoopView"]


class LoopView(Protocol):
    """What a guard or observer may read from the loop it is called with.

    The attributes are those of the lifecycle docs (``docs/lifecycle.md``): where the
    machine is, the counters of the current epoch and phase, the current batch's
    parts, the fit's outcome so far, its configuration, and its process group.
    """

    # -- where the machine is ----------------------------------------------------------

    @property
    def state(self) -> str:
        """The machine's current state (``idle``, ``fit``, ``epoch``, ... ``done``)."""

    @property
    def previous_state(self) -> str:
        """The state the last taken event left: an observer sees ``previous_state -> state``."""

    @property
    def machine(self) -> Machine:
        """The ``transitions`` machine: the authority on legality and diagrams."""

    @property
    def engine(self) -> str:
        """The name of the engine that runs the events (``compiled`` or ``transitions``)."""

    # -- counters ----------------------------------------------------------------------

    @property
    def epoch_count(self) -> int:
        """How many epochs the fit was asked for."""

    @property
    def epoch_index(self) -> int:
        """The current epoch, from 0."""

    @property
    def batch_index(self) -> int:
        """The current batch of the current phase, from 0 (vetoed batches count)."""

    @property
    def batch_count(self) -> int | None:
        """How many batches the current phase's data holds; ``None`` when it cannot say."""

    @property
    def batches_run(self) -> int:
        """Batches of the current phase whose ``batch_start`` was taken so far."""

    @property
    def is_training(self) -> bool:
        """Whether the current (or last) phase is a training phase."""

    @property
    def resuming(self) -> bool:
        """True while a resumed fit fires the events that re-enter the saved state."""

    # -- the current batch -------------------------------------------------------------

    @property
    def last_step_input(self) -> Any:
        """The current batch's input, as the ``Step`` split it (on the device)."""

    @property
    def last_step_target(self) -> Any:
        """The current batch's target."""

    @property
    def last_step_output(self) -> Any:
        """The model's output for the current batch, once the forward pass ran."""

    @property
    def last_step_loss(self) -> torch.Tensor | None:
        """The current batch's scalar loss, once computed (attached to its graph)."""

    # -- the outcome so far ------------------------------------------------------------

    @property
    def stop_reason(self) -> str | None:
        """Why the loop is stopping (or stopped), once a ``Stop`` was applied."""

    @property
    def failure(self) -> BaseException | None:
        """The exception the loop is winding down from (or wound down from)."""

    @property
    def decisions(self) -> Sequence[DecisionRecord]:
        """Every decision a hook took in this fit, in order, applied or not."""

    @property
    def history(self) -> History:
        """The final metric values of every phase that ran, so far."""

    @property
    def resumed_from(self) -> str | None:
        """Where the checkpoint this fit resumed from was read, or ``None``."""

    @property
    def metrics(self) -> dict[str, float]:
        """The current phase's metric values so far (synchronises with the device)."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names of the metrics the loop tracks, ``loss`` first."""

    def batch_losses(self) -> torch.Tensor | None:
        """The current phase's per-batch losses so far, detached, in batch order."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; legal only at exact boundaries."""

    # -- the configuration -------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module | None:
        """The model being fitted (wrapped for ``torch.distributed``), ``None`` before a fit."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the model's parameters."""

    @property
    def device(self) -> torch.device:
        """The device the fit runs on."""

    @property
    def step(self) -> Step:
        """The ``Step`` that splits batches and computes outputs and losses."""

    @property
    def has_validation(self) -> bool:
        """Whether the loop has validation data, so validation phases can run."""

    @property
    def callbacks(self) -> Sequence[object]:
        """The callbacks given to the loop's constructor."""

    @property
    def active_callbacks(self) -> Sequence[object]:
        """The callbacks of the current fit, in the order their hooks run."""

    # -- the process group -------------------------------------------------------------

    @property
    def collective(self) -> Collective | None:
        """The process group of the fit, or ``None`` for a single process."""

    @property
    def rank(self) -> int:
        """This process's rank (0 for a single process)."""

    @property
    def world_size(self) -> int:
        """How many processes run the fit (1 for a single process)."""

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0, or the only one)."""

    # -- what a hook may set -----------------------------------------------------------

    #: A factory of the context manager forward and loss run in (``MixedPrecision``).
    autocast: AutocastFactory | None
    #: The gradient scaler backward and the optimizer step go through (float16).
    grad_scaler: torch.amp.GradScaler | None

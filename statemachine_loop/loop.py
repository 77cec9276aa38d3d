"""``TrainingLoop``: a training loop whose lifecycle is a checked state machine.

This module is the composition root: it owns what the user configures (the
constructor's checks), the public surface hooks read (:class:`~.view.LoopView`), and
``fit``'s orchestration — preflight, the process group, resume, one fresh
:class:`~.run_state.RunState` and :class:`~.driver.Driver` per fit, binding the engine,
and the wind-down after a stop or a failure. The iteration itself is the driver's;
legality is the machine's (:mod:`statemachine_loop.machine`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from transitions import Machine

from statemachine_loop.callback import CallbackLike, HookMap, collect_hooks, ordered_callbacks
from statemachine_loop.decisions import DecisionRecord
from statemachine_loop.dispatch import ENGINES
from statemachine_loop.distributed import Collective
from statemachine_loop.driver import Driver
from statemachine_loop.errors import ConfigError, LifecycleError
from statemachine_loop.events import TRAINING, VALIDATION, Event
from statemachine_loop.fit_setup import FitSetup, prepare_fit
from statemachine_loop.history import History
from statemachine_loop.loop_state import ResumePoint, capture, resolve_resume
from statemachine_loop.machine import FINAL_STATE, INITIAL_STATE
from statemachine_loop.metrics import Metric, batch_losses_of, resolve_metrics
from statemachine_loop.policy import Stopping
from statemachine_loop.precision import AutocastFactory, Precision
from statemachine_loop.preflight import check_data, check_fit_arguments
from statemachine_loop.run_state import RunField, RunState
from statemachine_loop.step import LossFn, Step

__all__ = ["TrainingLoop"]


class TrainingLoop:
    """A training loop whose lifecycle is a checked finite-state machine.

    Configure it once with the data, the optimizer, the loss and the metrics, then
    call :meth:`fit` with a model. Callbacks hook the twelve lifecycle events as
    guards (which may veto, redirect or stop a proposed event) and observers (which
    act after it); see :class:`~statemachine_loop.Callback`. What a hook may read is
    :class:`~statemachine_loop.LoopView`; the loop's attributes listed there belong to
    the current fit (or the last one) and start afresh with each ``fit``.

    Args:
        training: an iterable of training batches, usually a ``DataLoader``.
        validation: an optional iterable of validation batches.
        optimizer: the optimizer over the parameters of the model passed to ``fit``.
        loss_fn: ``loss_fn(output, target)`` returning a scalar tensor.
        metrics: names (``"accuracy"``, ``"top5_accuracy"``, ``"mcc"``,
            ``"perplexity"``, ...) or objects following the ``Metric`` protocol; the
            loss is always measured.
        callbacks: callbacks for every ``fit`` of this loop.
        engine: ``"compiled"`` (default, fast) or ``"transitions"`` (every event
            through ``transitions``' ``Machine.trigger``; the reference).
        step: a :class:`~statemachine_loop.Step` for batches that are not
            ``(input, target)`` pairs.
        progress: show a ``ProgressBar`` (animated on a terminal, one line per phase
            elsewhere); ``False`` turns it off.
    """

    def __init__(
        self,
        *,
        training: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        validation: Iterable[Any] | None = None,
        metrics: Sequence[str | Metric] = (),
        callbacks: Sequence[CallbackLike] = (),
        engine: Literal["compiled", "transitions"] = "compiled",
        step: Step | None = None,
        progress: bool = True,
    ) -> None:
        check_data(TRAINING, training)
        if validation is not None:
            check_data(VALIDATION, validation)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}."
            )
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable; got {type(loss_fn).__name__}.")
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {sorted(ENGINES)}; got {engine!r}.")
        if step is not None and not isinstance(step, Step):
            raise ConfigError(f"step must be a Step instance; got {type(step).__name__}.")
        #: The optimizer over the parameters of the model passed to ``fit``.
        self.optimizer = optimizer
        #: The callbacks of every fit of this loop (a fit's own follow them).
        self.callbacks: list[CallbackLike] = list(callbacks)
        if progress:
            from statemachine_loop.callbacks.progress import ProgressBar

            if not any(isinstance(c, ProgressBar) for c in self.callbacks):
                self.callbacks.insert(0, ProgressBar())
        collect_hooks(self.callbacks)  # fail on a bad callback now, not at fit time
        self._training, self._validation = training, validation
        self._loss_fn = loss_fn
        self._step = step if step is not None else Step()
        self._metrics = resolve_metrics(metrics)
        self._engine = ENGINES[engine]()
        #: The ``transitions`` machine of this loop: the authority on legality.
        self.machine: Machine = self._engine.machine
        self._precision = Precision()
        self._setup: FitSetup | None = None
        self._run = RunState()
        self._running = False

    # -- fit ---------------------------------------------------------------------------

    def fit(
        self,
        model: torch.nn.Module,
        epochs: int,
        *,
        device: str | torch.device = "cpu",
        callbacks: Sequence[CallbackLike] = (),
        resume: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    ) -> History:
        """Train ``model`` for ``epochs`` epochs and return the :class:`History`.

        ``callbacks`` are added after the loop's own for this fit only (callbacks
        whose class sets ``runs_last``, such as ``Checkpoint``, move to the end so
        they see every other callback's work). After a stop the fit returns normally
        with ``stop_reason`` set; after an exception every open scope is closed (so
        writers flush) and the original exception is re-raised. ``stop_reason``,
        ``failure`` and ``decisions`` stay readable until the next ``fit``.

        ``resume`` continues from a checkpoint: a file or directory path, a payload
        from :meth:`state_dict`, or ``"auto"`` for the newest valid checkpoint of the
        fit's ``Checkpoint`` callback (a fresh start when there is none;
        ``resumed_from`` says which).
        The resumed run re-enters the saved state by firing ``fit_start`` and the
        start events of the scopes that were open, with ``resuming`` true, then goes
        on exactly as the interrupted run would have.
        """
        if self._running:
            raise LifecycleError(
                f"fit was called while this loop is already fitting (state {self.state!r})."
            )
        check_fit_arguments(model, epochs, self.optimizer)
        if self.state not in (INITIAL_STATE, FINAL_STATE):
            raise LifecycleError(f"fit cannot start from state {self.state!r}.")
        fit_callbacks = ordered_callbacks(self.callbacks, callbacks)
        hooks = collect_hooks(fit_callbacks)
        resume_point = resolve_resume(resume, fit_callbacks)
        setup = self._setup = self._prepare(model, device, fit_callbacks, hooks)
        run = self._run = RunState(epoch_count=epochs)
        if resume_point is not None:
            resume_point.restore_before_fit(setup, run)
        driver = Driver(setup, run, self._engine)
        self._engine.bind(
            hooks,
            driver.entries,
            view=self,
            run=run,
            can_validate=setup.validation is not None,
            collective=setup.collective,
        )
        self._drive(driver, resume_point)
        return run.history

    def _prepare(
        self,
        model: torch.nn.Module,
        device: str | torch.device,
        callbacks: tuple[CallbackLike, ...],
        hooks: HookMap,
    ) -> FitSetup:
        return prepare_fit(
            model,
            device,
            optimizer=self.optimizer,
            loss_fn=self._loss_fn,
            step=self._step,
            metrics=self._metrics,
            training=self._training,
            validation=self._validation,
            callbacks=callbacks,
            hooks=hooks,
            precision=self._precision,
        )

    def _drive(self, driver: Driver, resume: ResumePoint | None) -> None:
        """Run the driver; wind down after a stop or a failure (re-raised unchanged)."""
        grad_enabled = torch.is_grad_enabled()
        self._running = True
        stopped = False
        try:
            driver.run(resume)
        except Stopping:
            stopped = True
        except BaseException as failure:
            self._run.failed(failure)
            for error, name, event in self._engine.wind_down():
                failure.add_note(_wind_down_note(error, name, event))
            raise
        finally:
            self._running = False
            torch.set_grad_enabled(grad_enabled)
        if stopped:
            self._wind_down_after_stop()

    def _wind_down_after_stop(self) -> None:
        errors = self._engine.wind_down()
        if errors:
            first, _, _ = errors[0]
            for error, name, event in errors[1:]:
                first.add_note(_wind_down_note(error, name, event))
            self._run.failed(first)
            raise first

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain data (see ``Checkpoint``).

        Legal only where the state is exact: between epochs (observers of
        ``epoch_end``, guards of ``epoch_start``) and at batch boundaries (observers
        of ``batch_end``, a phase start's observers). After a batch was fetched, and
        until it ends, the data's generators have drawn for it, so a resume would
        draw again: there (guards of ``batch_start`` and of the phase ends) it raises
        ``LifecycleError``.
        """
        setup = self._setup
        if setup is None:
            raise LifecycleError(
                "state_dict() needs a fit: it captures a fit's state at an exact boundary; "
                f"the loop is in state {self.state!r} and has not fitted yet."
            )
        return capture(setup, self._run, self.state, self.previous_state)

    # -- where the machine is ----------------------------------------------------------

    @property
    def state(self) -> str:
        """The machine's current state name (``idle``, ``fit``, ``epoch``, ... ``done``)."""
        return self._engine.state

    @property
    def previous_state(self) -> str:
        """The state the last taken event left: an observer sees ``previous_state -> state``."""
        return self._engine.source

    @property
    def engine(self) -> str:
        """The name of the engine that runs this loop's events."""
        return self._engine.name

    # -- the current fit's run state ---------------------------------------------------

    epoch_count = RunField[int]()
    """How many epochs the current (or last) fit was asked for."""
    epoch_index = RunField[int]()
    """The current epoch, from 0."""
    batch_index = RunField[int]()
    """The current batch of the current phase, from 0 (vetoed batches count)."""
    batch_count = RunField[int | None]()
    """How many batches the current phase's data holds; ``None`` when it cannot say."""
    batches_run = RunField[int]()
    """Batches of the current phase whose ``batch_start`` was taken so far.

    Each gets exactly one ``batch_end`` (a vetoed batch is not counted); a phase-end
    observer reads the phase's count here instead of counting per batch itself.
    """
    is_training = RunField[bool]()
    """Whether the current (or last) phase is a training phase."""
    resuming = RunField[bool]()
    """True while a resumed fit fires the events that re-enter the saved state."""
    last_step_input = RunField[Any]()
    """The current batch's input, as the ``Step`` split it (on the device)."""
    last_step_target = RunField[Any]()
    """The current batch's target."""
    last_step_output = RunField[Any]()
    """The model's output for the current batch, once the forward pass ran."""
    last_step_loss = RunField[torch.Tensor | None]()
    """The current batch's scalar loss, once computed (attached to its graph)."""
    stop_reason = RunField[str | None]()
    """Why the loop is stopping (or stopped), once a ``Stop`` was applied."""
    failure = RunField[BaseException | None]()
    """The exception the loop is winding down from (or wound down from)."""
    decisions = RunField[list[DecisionRecord]]()
    """Every decision a hook took in this fit, in order, applied or not."""
    history = RunField[History]()
    """The final metric values of every phase that ran, so far."""
    resumed_from = RunField[str | None]()
    """Where the checkpoint this fit resumed from was read, or ``None``."""

    @property
    def autocast(self) -> AutocastFactory | None:
        """Set by a callback (``MixedPrecision``) to run forward and loss under autocast."""
        return self._precision.autocast

    @autocast.setter
    def autocast(self, factory: AutocastFactory | None) -> None:
        self._precision.autocast = factory

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """Set by a callback (``MixedPrecision`` with float16) to scale the loss."""
        return self._precision.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        self._precision.grad_scaler = scaler

    @property
    def metrics(self) -> dict[str, float]:
        """The current phase's metric values so far; final after its end event.

        Reading this synchronises with the device, so read it at phase ends or at a
        progress display's refresh rate, not on every batch of a GPU run. Under
        ``torch.distributed`` running values are this rank's; from the phase end on
        they are the global values of all ranks.
        """
        final = self._run.final_metrics
        if final is not None:
            return dict(final)
        return {metric.name: metric.compute() for metric in self._metrics}

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The keys of ``metrics`` and of each ``History`` entry (besides ``"epoch"``)."""
        return tuple(metric.name for metric in self._metrics)

    def batch_losses(self) -> torch.Tensor | None:
        """The current phase's per-batch losses so far, in batch order, detached.

        One 1-D tensor on the device, kept by the built-in ``loss`` metric: one entry
        per batch it scored (a batch whose prediction was vetoed has none, nor has the
        batch a stop cut short between its loss and its metrics). Loggers read it in
        chunks instead of detaching every ``last_step_loss`` again. Reading the values
        synchronises with the device, so do it in chunks, not per batch. ``None`` when
        ``loss`` is a user's own metric object, which keeps no such record.
        """
        return batch_losses_of(self._metrics[0])

    # -- the configuration -------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module | None:
        """The model of the current (or last) fit, wrapped under ``torch.distributed``."""
        return None if self._setup is None else self._setup.model

    @property
    def device(self) -> torch.device:
        """The device of the current (or last) fit (the CPU before the first)."""
        return torch.device("cpu") if self._setup is None else self._setup.device

    @property
    def step(self) -> Step:
        """The :class:`Step` that splits batches and computes outputs and losses."""
        return self._step

    @property
    def has_validation(self) -> bool:
        """Whether the loop has validation data, so validation phases can run."""
        return self._validation is not None

    @property
    def active_callbacks(self) -> tuple[CallbackLike, ...]:
        """The callbacks of the current (or last) fit, in the order their hooks run."""
        return () if self._setup is None else self._setup.callbacks

    # -- the process group -------------------------------------------------------------

    @property
    def collective(self) -> Collective | None:
        """The process group of the current fit, or ``None`` for a single process."""
        return None if self._setup is None else self._setup.collective

    @property
    def rank(self) -> int:
        """This process's rank under ``torch.distributed`` (0 for a single process)."""
        collective = self.collective
        return 0 if collective is None else collective.rank

    @property
    def world_size(self) -> int:
        """How many processes run this fit (1 for a single process)."""
        collective = self.collective
        return 1 if collective is None else collective.world_size

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0, or the only one)."""
        collective = self.collective
        return collective is None or collective.is_main


def _wind_down_note(error: BaseException, name: str, event: Event) -> str:
    return (
        f"During the wind-down, {name} also raised at {event.value}: "
        f"{type(error).__name__}: {error}"
    )

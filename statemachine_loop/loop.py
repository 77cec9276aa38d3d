"""``TrainingLoop``: a training loop whose lifecycle is a checked state machine.

This module owns what the user configures and reads — the constructor's checks,
the state visible to callbacks, and ``fit``'s orchestration: preflight, the process
group, resume, binding the engine, and the wind-down after a stop or a failure.
The iteration itself is the driver's (:mod:`statemachine_loop.driver`); legality is
the machine's (:mod:`statemachine_loop.machine`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from statemachine_loop.callback import CallbackLike, HookMap, collect_hooks
from statemachine_loop.decisions import DecisionRecord
from statemachine_loop.dispatch import ENGINES, Stopping
from statemachine_loop.distributed import (
    Collective,
    distribute_data,
    join_process_group,
)
from statemachine_loop.driver import Driver
from statemachine_loop.errors import ConfigError, LifecycleError
from statemachine_loop.events import ALL_EVENTS, Event
from statemachine_loop.history import History
from statemachine_loop.loop_state import ResumePoint, capture, resolve_resume
from statemachine_loop.machine import FINAL_STATE, INITIAL_STATE
from statemachine_loop.metrics import Metric, _Loss, resolve_metrics
from statemachine_loop.preflight import (
    check_data,
    check_fit_arguments,
    move_optimizer_state,
    resolve_device,
)
from statemachine_loop.step import LossFn, Step

__all__ = ["TrainingLoop"]


class TrainingLoop(Driver):
    """A training loop whose lifecycle is a checked finite-state machine.

    Configure it once with the data, the optimizer, the loss and the metrics, then
    call :meth:`fit` with a model. Callbacks hook the twelve lifecycle events as
    guards (which may veto, redirect or stop a proposed event) and observers (which
    act after it); see :class:`~statemachine_loop.Callback`.

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
        check_data("training", training)
        if validation is not None:
            check_data("validation", validation)
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
        if isinstance(metrics, str):
            raise ConfigError(f"metrics must be a list of names; got the string {metrics!r}.")
        self.optimizer = optimizer
        self.callbacks: list[CallbackLike] = list(callbacks)
        if progress:
            from statemachine_loop.callbacks.progress import ProgressBar

            if not any(isinstance(c, ProgressBar) for c in self.callbacks):
                self.callbacks.insert(0, ProgressBar())
        collect_hooks(self.callbacks)  # fail on a bad callback now, not at fit time
        self._training = training
        self._validation = validation
        self._fit_training, self._fit_validation = training, validation  # sharded per fit
        self._loss_fn = loss_fn
        self._step = step if step is not None else Step()
        step_class = type(self._step)
        self._plain_step = step_class.forward is Step.forward and step_class.loss is Step.loss
        self._plain_batch = self._plain_step and (
            step_class.split is Step.split and step_class.batch_size is Step.batch_size
        )
        self._metrics = resolve_metrics(metrics)
        self._engine = ENGINES[engine](self)
        #: The ``transitions`` machine of this loop: the authority on legality.
        self.machine = self._engine.machine
        self._entries: dict[Event, Callable[[], None]] = {
            Event.TRAINING_START: self._open_training,
            Event.VALIDATION_START: self._open_validation,
            Event.TRAINING_END: self._close_phase,
            Event.VALIDATION_END: self._close_phase,
            Event.EPOCH_END: self._close_epoch,
        }
        self.model: torch.nn.Module | None = None
        self.device = torch.device("cpu")
        self.epoch_count = 0
        self.epoch_index = 0
        self.batch_index = 0
        self.batch_count: int | None = None
        #: Batches of the current phase whose ``batch_start`` was taken so far; each
        #: gets exactly one ``batch_end`` (a vetoed batch is not counted). A phase-end
        #: observer reads the phase's count here instead of counting per batch itself.
        self.batches_run = 0
        self.is_training = False
        self.resuming = False
        self.last_step_input: Any = None
        self.last_step_target: Any = None
        self.last_step_output: Any = None
        self.last_step_loss: torch.Tensor | None = None
        self.stop_reason: str | None = None
        self.failure: BaseException | None = None
        self.decisions: list[DecisionRecord] = []
        self.history = History()
        #: Set by a callback (``MixedPrecision``) to run forward and loss under autocast.
        self.autocast: Callable[[], AbstractContextManager[Any]] | None = None
        #: Set by a callback (``MixedPrecision`` with float16) to scale the loss.
        self.grad_scaler: torch.amp.GradScaler | None = None
        #: Where the checkpoint this fit resumed from was read, or ``None``.
        self.resumed_from: str | None = None
        self._phase_ran = False
        self._validation_proposed = False
        self._next_epoch = 0  # the epoch a checkpoint taken now would continue with
        self._next_batch = 0  # likewise, the next batch of the current phase
        self._phase_rng: dict[str, Any] | None = None
        self._keep_phase_rng = True
        self._fit_callbacks: list[CallbackLike] = []
        self._final_metrics: dict[str, float] | None = None
        #: The process group of the current fit, or ``None`` for a single process.
        self.collective: Collective | None = None
        self._resume: ResumePoint | None = None
        self._move: Callable[[Any], Any] = self._first_move
        self._running = False

    @property
    def state(self) -> str:
        """The machine's current state name (``idle``, ``fit``, ``epoch``, ... ``done``)."""
        return self._engine.model.state

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The keys of ``metrics`` and of each ``History`` entry (besides ``"epoch"``)."""
        return tuple(metric.name for metric in self._metrics)

    @property
    def active_callbacks(self) -> tuple[CallbackLike, ...]:
        """The callbacks of the current (or last) fit, in the order their hooks run."""
        return tuple(self._fit_callbacks)

    @property
    def step(self) -> Step:
        """The :class:`Step` that splits batches and computes outputs and losses."""
        return self._step

    @property
    def _fit_datasets(self) -> tuple[Iterable[Any], ...]:
        validation = self._fit_validation
        return (self._fit_training,) if validation is None else (self._fit_training, validation)

    @property
    def rank(self) -> int:
        """This process's rank under ``torch.distributed`` (0 for a single process)."""
        return 0 if self.collective is None else self.collective.rank

    @property
    def world_size(self) -> int:
        """How many processes run this fit (1 for a single process)."""
        return 1 if self.collective is None else self.collective.world_size

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0, or the only one)."""
        return self.collective is None or self.collective.is_main

    @property
    def has_validation(self) -> bool:
        """Whether the loop has validation data, so validation phases can run."""
        return self._validation is not None

    @property
    def previous_state(self) -> str:
        """The state the last taken event left: an observer sees ``previous_state -> state``."""
        return self._engine.source

    @property
    def engine(self) -> str:
        """The name of the engine that runs this loop's events."""
        return self._engine.name

    @property
    def metrics(self) -> dict[str, float]:
        """The current phase's metric values so far; final after its end event.

        Reading this synchronises with the device, so read it at phase ends or at a
        progress display's refresh rate, not on every batch of a GPU run. Under
        ``torch.distributed`` running values are this rank's; from the phase end on
        they are the global values of all ranks.
        """
        if self._final_metrics is not None:
            return dict(self._final_metrics)
        return {metric.name: metric.compute() for metric in self._metrics}

    def batch_losses(self) -> torch.Tensor | None:
        """The current phase's per-batch losses so far, in batch order, detached.

        One 1-D tensor on the device, kept by the built-in ``loss`` metric: one entry
        per batch it scored (a batch whose prediction was vetoed has none, nor has the
        batch a stop cut short between its loss and its metrics). Loggers read it in
        chunks instead of detaching every ``last_step_loss`` again, which on a small
        model is a measurable share of a step. Reading the values synchronises with
        the device, so do it in chunks, not per batch. ``None`` when ``loss`` is a
        user's own metric object, which keeps no such record.
        """
        loss_metric = self._metrics[0]
        return loss_metric.batch_losses() if isinstance(loss_metric, _Loss) else None

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
        tensors = check_fit_arguments(model, epochs, self.optimizer)
        if self.state not in (INITIAL_STATE, FINAL_STATE):
            raise LifecycleError(f"fit cannot start from state {self.state!r}.")
        ordered = [*self.callbacks, *callbacks]
        self._fit_callbacks = [
            *(c for c in ordered if not getattr(c, "runs_last", False)),
            *(c for c in ordered if getattr(c, "runs_last", False)),
        ]
        hooks = collect_hooks(self._fit_callbacks)
        self._keep_phase_rng = hooks.mid_phase
        self._resume, self.resumed_from = resolve_resume(resume, self._fit_callbacks)
        self.device = resolve_device(device)
        self.collective = join_process_group(self.device)
        on_device = all(tensor.device == self.device for tensor in tensors)
        # model.to would be a no-op that still walks every module (~0.1 ms, per fit).
        self.model = model if on_device else model.to(self.device)
        self._fit_training, self._fit_validation = self._training, self._validation
        if self.collective is not None:
            self.model, self._fit_training, self._fit_validation = self._distribute(hooks)
        move_optimizer_state(self.optimizer, self.device)
        self.epoch_count = epochs
        self.epoch_index = self.batch_index = 0
        self.batch_count = None
        self.is_training = self.resuming = False
        self.last_step_input = self.last_step_target = None
        self.last_step_output = self.last_step_loss = None
        self.stop_reason = None
        self.failure = None
        self.decisions = []
        self.history = History()
        self._next_epoch = self._next_batch = 0
        if self._resume is not None:
            self._resume.restore_before_fit(self)
            self.resuming = True
        self._engine.bind(
            hooks,
            self._entries,
            can_validate=self._validation is not None,
            collective=self.collective,
        )
        grad_enabled = torch.is_grad_enabled()
        self._running = True
        stopped = False
        try:
            self._run_fit()
        except Stopping:
            stopped = True
        except BaseException as failure:
            self.failure = failure
            for error, name, event in self._engine.wind_down():
                failure.add_note(_wind_down_note(error, name, event))
            raise
        finally:
            self._running = False
            torch.set_grad_enabled(grad_enabled)
        if stopped:
            self._wind_down_after_stop()
        return self.history

    def _distribute(
        self, hooks: HookMap
    ) -> tuple[torch.nn.Module, Iterable[Any], Iterable[Any] | None]:
        """Check every rank hooks the same events; wrap the model; shard the data."""
        assert self.collective is not None and self.model is not None
        signature = _hook_signature(hooks)
        if any(other != signature for other in self.collective.gather(signature)):
            raise ConfigError(
                "Ranks were given different callbacks (their hooks differ), so they would "
                "wait on each other forever; pass the same callbacks on every rank (the "
                "built-in writers already write on rank 0 only)."
            )
        model = self.model
        if not isinstance(model, DistributedDataParallel):
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        validation = self._validation
        return (
            model,
            distribute_data(self._training, self.collective, name="training"),
            None
            if validation is None
            else distribute_data(validation, self.collective, name="validation"),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain data (see ``Checkpoint``).

        Legal only where the state is exact: between epochs (observers of
        ``epoch_end``, guards of ``epoch_start``) and at batch boundaries (observers
        of ``batch_end``, a phase start's observers). After a batch was fetched, and
        until it ends, the data's generators have drawn for it, so a resume would draw
        again: there (guards of ``batch_start`` and of the phase ends) it raises
        ``LifecycleError``.
        """
        return capture(self)

    def _wind_down_after_stop(self) -> None:
        errors = self._engine.wind_down()
        if errors:
            first, _, _ = errors[0]
            for error, name, event in errors[1:]:
                first.add_note(_wind_down_note(error, name, event))
            self.failure = first
            raise first


def _hook_signature(hooks: HookMap) -> list[tuple[str, int, int, int]]:
    return [
        (
            event.value,
            len(hooks.guards[event]),
            len(hooks.observers[event]),
            len(hooks.stoppers[event]),
        )
        for event in ALL_EVENTS
    ]


def _wind_down_note(error: BaseException, name: str, event: Event) -> str:
    return (
        f"During the wind-down, {name} also raised at {event.value}: "
        f"{type(error).__name__}: {error}"
    )

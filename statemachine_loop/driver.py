"""The driver: the one place that iterates epochs, phases and batches.

The machine decides, the driver does. Every event is *proposed* to the engine
(:mod:`statemachine_loop.dispatch`), which runs the guards, moves the machine and
calls the observers, and answers with the event actually taken (``None`` for a veto;
a redirect answers with its target). The driver only iterates and does the work::

    fit:    propose fit_start                          (vetoed: return)
            for each epoch: propose epoch_start         (redirected to fit_end: return)
                              -> epoch
            propose fit_end
    epoch:  propose training_start -> phase            (a redirect may open validation
            propose validation_start -> phase            or close the epoch)
            propose epoch_end
    phase:  for each batch: fetch, move, split; propose batch_start
                              (redirected to the phase end: return)
                              -> step; propose batch_end
            propose training_end | validation_end
    step:   training:   forward, loss, backward; propose update_start -> optimizer.step()
            validation: forward; propose inference_prediction_end -> loss, metrics

A ``Stop`` raises a private signal out of the driver; ``TrainingLoop.fit`` then
winds down along the machine's shortest path of end events. Any other exception does
the same with ``loop.failure`` set, and is re-raised unchanged.

The entry work — what the loop itself does when an event is proposed, whoever
proposes it (the driver, a redirect or the wind-down) — lives here too
(:attr:`Driver.entries`): a phase start sets the mode and ``batch_count`` and resets
the metrics; a phase end finalises them into ``History``. Everything the driver
learns is recorded in the fit's :class:`~statemachine_loop.run_state.RunState`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch

from statemachine_loop.distributed import set_sampler_epoch
from statemachine_loop.errors import LifecycleError
from statemachine_loop.events import TRAINING, Event
from statemachine_loop.fit_setup import FitSetup
from statemachine_loop.loop_state import ResumePoint
from statemachine_loop.machine import BETWEEN_EPOCHS, PHASE_OF_STATE
from statemachine_loop.policy import Engine, EntryWork, Stopping
from statemachine_loop.precision import AutocastFactory
from statemachine_loop.preflight import length_of
from statemachine_loop.resume import phase_start_rng, restore_phase_start_rng, resumed_data
from statemachine_loop.run_state import RunState
from statemachine_loop.step import bind_step, move_to_device, needs_move

__all__ = ["Driver"]

FIT_START, FIT_END = Event.FIT_START, Event.FIT_END
EPOCH_START, EPOCH_END = Event.EPOCH_START, Event.EPOCH_END
TRAINING_START, TRAINING_END = Event.TRAINING_START, Event.TRAINING_END
VALIDATION_START, VALIDATION_END = Event.VALIDATION_START, Event.VALIDATION_END
BATCH_START, UPDATE_START, BATCH_END = Event.BATCH_START, Event.UPDATE_START, Event.BATCH_END
INFERENCE_PREDICTION_END = Event.INFERENCE_PREDICTION_END


class Driver:
    """Iterates one fit's lifecycle and does the work between its events.

    Built by ``TrainingLoop.fit`` for each fit, from the fit's setup, its fresh run
    state and the loop's engine; :meth:`run` drives it from ``fit_start`` to
    ``fit_end`` (see the module docstring).
    """

    # The proposals of the per-batch events, from the engine once it is bound (``run``).
    _start_batch: Callable[[], Event | None]
    _update: Callable[[], Event | None]
    _predicted: Callable[[], Event | None]
    _end_batch: Callable[[], Event | None]

    def __init__(self, setup: FitSetup, run: RunState, engine: Engine) -> None:
        self._setup, self._run, self._engine = setup, run, engine
        self._propose = engine.propose
        self._step = bind_step(setup.step)
        # How a phase's batches reach the device: decided on its first batch (None: as is).
        self._move: Callable[[Any], Any] | None = self._first_move
        self._validation_proposed = False
        # Only a hook that runs inside phases can take a checkpoint there, which needs
        # the random state of the phase's start: a fit without one does not keep it.
        self._keep_phase_rng = setup.hooks.mid_phase

    @property
    def entries(self) -> EntryWork:
        """The loop's own work for each event that has some, done when it is proposed."""
        return {
            TRAINING_START: self._open_training,
            VALIDATION_START: self._open_validation,
            TRAINING_END: self._close_phase,
            VALIDATION_END: self._close_phase,
            EPOCH_END: self._run.epoch_closed,
        }

    # -- the lifecycle ---------------------------------------------------------------

    def run(self, resume: ResumePoint | None) -> None:
        """Fire the fit's events from ``fit_start`` to ``fit_end``, doing the work between."""
        run, propose, proposer = self._run, self._propose, self._engine.proposer
        self._start_batch, self._end_batch = proposer(BATCH_START), proposer(BATCH_END)
        self._update, self._predicted = proposer(UPDATE_START), proposer(INFERENCE_PREDICTION_END)
        if propose(FIT_START) is None:
            return
        first_epoch = 0
        if resume is not None:
            first_epoch = resume.next_epoch
            resume = self._reenter_fit(resume)
        for epoch_index in range(first_epoch, run.epoch_count):
            run.epoch_opened(epoch_index)
            taken = propose(EPOCH_START)
            if taken is FIT_END:
                return
            if taken is EPOCH_START:
                self._run_epoch(resume)
            elif resume is not None:
                raise _reentry_refused(EPOCH_START)
            else:
                run.epoch_closed()  # a vetoed epoch still counts against ``epochs``
            resume = None
        propose(FIT_END)

    def _run_epoch(self, resume: ResumePoint | None) -> None:
        setup, propose = self._setup, self._propose
        self._validation_proposed = False  # set by the validation entry, whoever proposes it
        taken: Event | None = None
        if resume is None or PHASE_OF_STATE[resume.state] == TRAINING:
            taken = propose(TRAINING_START)
            if taken is EPOCH_END:
                return
            if taken is TRAINING_START:
                self._run_phase(setup.training, TRAINING_END, self._training_work(), resume)
            elif resume is not None:
                raise _reentry_refused(TRAINING_START)
            resume = None
        if setup.validation is not None and not self._validation_proposed:
            taken = propose(VALIDATION_START)
            if taken is EPOCH_END:
                return
        if taken is VALIDATION_START:
            assert setup.validation is not None
            self._run_phase(setup.validation, VALIDATION_END, self._validation_work(), resume)
        elif resume is not None:
            raise _reentry_refused(VALIDATION_START)
        propose(EPOCH_END)

    def _run_phase(
        self,
        data: Iterable[Any],
        end: Event,
        work: Callable[[Any, Any], None],
        resume: ResumePoint | None,
    ) -> None:
        """The phase's batches: fetch, move, split; propose batch_start; ``work``; batch_end."""
        run = self._run
        first = 0
        if resume is not None:
            data, first = self._reenter_phase(data, resume), resume.next_batch
        elif self._keep_phase_rng:
            run.phase_rng_kept(phase_start_rng(data))
        split, phase_state = self._step.split, self._engine.state
        fetched, started, ended = run.batch_fetched, run.batch_started, run.batch_ended
        start_batch, end_batch = self._start_batch, self._end_batch
        for index, batch in enumerate(data, first):
            # Held until this batch's loss replaces it, as a hand-written loop holds its
            # ``loss``: the last graph keeps the parameters' gradient accumulators alive,
            # so autograd reuses them instead of building new ones every batch.
            previous_loss = run.last_step_loss
            try:
                move = self._move
                inputs, target = split(batch if move is None else move(batch))
            except BaseException:
                fetched(index, None, None)  # fetched all the same: no exact resume from here
                raise
            fetched(index, inputs, target)
            try:
                taken = start_batch()
            except BaseException:
                if self._engine.state != phase_state:  # taken; then an observer stopped or raised
                    run.batch_cut_short()
                raise
            if taken is BATCH_START:
                started()
                work(inputs, target)
                del previous_loss
                ended()
                end_batch()
            elif taken is end:
                return
        run.data_exhausted()
        self._propose(end)

    def _training_work(self) -> Callable[[Any, Any], None]:
        """One training batch's work, with the fit's parts bound once for the phase."""
        setup, run, step = self._setup, self._run, self._step
        precision, model, loss_fn = setup.precision, setup.model, setup.loss_fn
        forward, loss_of, batch_size = step.forward, step.loss, step.batch_size
        optimizer, metrics, update = setup.optimizer, setup.metrics, self._update
        backward, forwarded, scored = torch.autograd.backward, run.forwarded, run.scored

        def train(inputs: Any, target: Any) -> None:
            """Forward, loss, backward; propose update_start -> optimizer.step(); metrics."""
            autocast, scaler = precision.autocast, precision.grad_scaler
            if autocast is None:
                output = forward(model, inputs)
                forwarded(output)
                loss = scored(loss_of(loss_fn, output, target))
            else:
                output, loss = self._autocast_forward(autocast, inputs, target)
            backward(loss if scaler is None else scaler.scale(loss))
            if update() is UPDATE_START:
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad()
            size = batch_size(inputs, target)
            for metric in metrics:
                metric.update(output, target, loss, size)

        return train

    def _autocast_forward(
        self, autocast: AutocastFactory, inputs: Any, target: Any
    ) -> tuple[Any, torch.Tensor]:
        """The training step's forward pass and loss, under ``autocast``."""
        setup, run, step = self._setup, self._run, self._step
        with autocast():
            output = step.forward(setup.model, inputs)
            run.forwarded(output)
            return output, run.scored(step.loss(setup.loss_fn, output, target))

    def _validation_work(self) -> Callable[[Any, Any], None]:
        """One validation batch's work, with the fit's parts bound once for the phase."""
        setup, run, step = self._setup, self._run, self._step
        precision, model, loss_fn = setup.precision, setup.model, setup.loss_fn
        forward, loss_of, batch_size = step.forward, step.loss, step.batch_size
        metrics, predicted = setup.metrics, self._predicted

        def validate(inputs: Any, target: Any) -> None:
            """Forward; propose inference_prediction_end -> loss, metrics."""
            autocast = precision.autocast
            with nullcontext() if autocast is None else autocast():
                output = forward(model, inputs)
                run.forwarded(output)
                if predicted() is None:
                    return
                loss = run.scored(loss_of(loss_fn, output, target))
            size = batch_size(inputs, target)
            for metric in metrics:
                metric.update(output, target, loss, size)

        return validate

    # -- re-entering a checkpoint ------------------------------------------------------

    def _reenter_fit(self, resume: ResumePoint) -> ResumePoint | None:
        """Restore what ``fit_start``'s observers set up; the resume point if mid-phase."""
        setup, run = self._setup, self._run
        resume.restore_after_fit_start(setup)
        if resume.stop_reason is not None:  # the interrupted run was stopping here
            run.reentered_stopping(resume.stop_reason)
            raise Stopping
        if resume.state == BETWEEN_EPOCHS:
            resume.restore_rng(setup)
            run.reentered()
            return None
        return resume

    def _reenter_phase(self, data: Iterable[Any], resume: ResumePoint) -> Iterable[Any]:
        """Restore the phase's state after its re-entered start; the data from the next batch."""
        setup, run = self._setup, self._run
        resume.restore_phase(setup, run)
        phase_rng = resume.rank_state(setup)["phase_rng"]
        if phase_rng is None:  # taken at the phase start, before its iterator existed
            resume.restore_rng(setup)
            run.phase_rng_kept(phase_start_rng(data))
            return data
        run.phase_rng_kept(phase_rng)
        restore_phase_start_rng(data, phase_rng)
        return resumed_data(data, resume.next_batch, lambda: resume.restore_rng(setup))

    # -- entry work: done when the event is proposed, whoever proposes it --------------

    def _open_phase(self, training: bool, data: Iterable[Any]) -> None:
        setup, run = self._setup, self._run
        run.phase_opened(training=training, batch_count=length_of(data))
        setup.model.train(training)
        torch.set_grad_enabled(training)
        set_sampler_epoch(data, run.epoch_index)
        for metric in setup.metrics:
            metric.reset()
        self._move = self._first_move

    def _open_training(self) -> None:
        self._open_phase(True, self._setup.training)
        self._setup.optimizer.zero_grad()

    def _open_validation(self) -> None:
        assert self._setup.validation is not None
        self._validation_proposed = True
        self._open_phase(False, self._setup.validation)

    def _close_phase(self) -> None:
        run, setup = self._run, self._setup
        if not run.phase_ran:
            return
        if setup.collective is None:
            metrics = {metric.name: metric.compute() for metric in setup.metrics}
        else:
            metrics = setup.collective.global_metrics(setup.metrics)
        run.phase_closed(metrics)

    def _first_move(self, batch: Any) -> Any:
        """Decide, on a phase's first batch, whether batches need moving at all."""
        device = self._setup.device
        if needs_move(batch, device):
            non_blocking = device.type == "cuda"

            def move(batch: Any) -> Any:
                return move_to_device(batch, device, non_blocking)

            self._move = move
            return move(batch)
        self._move = None
        return batch


def _reentry_refused(event: Event) -> LifecycleError:
    return LifecycleError(
        f"Resuming needs {event.value!r} to be taken to re-enter the saved state, but a "
        "guard refused it; guards can read loop.resuming to let re-entry events pass."
    )

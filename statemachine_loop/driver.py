"""The driver: the one place that iterates epochs, phases and batches.

The machine decides, the driver does. Every event is *proposed* to the engine
(:mod:`statemachine_loop.dispatch`), which runs the guards, moves the machine and
calls the observers, and answers with the event actually taken (``None`` for a veto;
a redirect answers with its target). The driver only iterates and does the work::

    fit:    propose fit_start                         (vetoed: return)
            for each epoch: propose epoch_start        (redirected to fit_end: return)
                               -> run the epoch
            propose fit_end
    epoch:  propose training_start -> training phase   (redirect may open validation
            propose validation_start -> validation phase    or close the epoch)
            propose epoch_end
    phase:  for each batch: fetch, move, split; propose batch_start
                               (redirected to the phase end: return)
                               -> step; propose batch_end
            propose training_end | validation_end
    step:   training:   forward, loss, backward; propose update_start -> optimizer.step()
            validation: forward; propose inference_prediction_end -> loss, metrics

A training phase whose ``batch_start`` and ``update_start`` no callback hooks, with
the default ``Step`` and no autocast, runs the same steps inline
(``_run_plain_training``): those proposals could only move the machine, so the
driver moves it to the states the engine read off the machine, and proposes
``batch_end`` only when a guard hooks it (observers alone it calls itself).
``tests/test_plain_path.py`` holds it equal to the reference engine, which always
proposes every event.

A ``Stop`` raises a private signal out of the driver; ``TrainingLoop.fit`` then
winds down along the machine's shortest path of end events. Any other exception does
the same with ``loop.failure`` set, and is re-raised unchanged.

The entry work — what the loop itself does when an event is proposed, whoever
proposes it (the driver, a redirect or the wind-down) — lives here too: a phase
start sets the mode and ``batch_count`` and resets the metrics; a phase end
finalises them into ``History``. ``Driver`` is the base of ``TrainingLoop``, which
owns configuration, readable state and ``fit``'s orchestration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch

from statemachine_loop.callback import CallbackLike
from statemachine_loop.dispatch import Engine, Stopping
from statemachine_loop.distributed import Collective, set_sampler_epoch
from statemachine_loop.errors import LifecycleError
from statemachine_loop.events import Event
from statemachine_loop.history import History
from statemachine_loop.loop_state import ResumePoint
from statemachine_loop.metrics import Metric
from statemachine_loop.preflight import checked_loss, length_of
from statemachine_loop.resume import phase_start_rng, restore_phase_start_rng, resumed_data
from statemachine_loop.step import LossFn, Step, move_to_device, needs_move

if TYPE_CHECKING:
    from statemachine_loop.loop import TrainingLoop

__all__ = ["MID_BATCH", "Driver"]

#: ``_next_batch`` between a batch's fetch and its ``batch_end``: not a resumable point.
MID_BATCH = -1

# How far the plain training loop got with its current batch: fetched; started (split,
# batch_start taken); forward done; loss checked; backward done (updating); ended
# (metrics updated, batch_end due); settled (everything hooks read is written).
_FETCHED, _STARTED, _FORWARDED, _SCORED, _UPDATING, _ENDED, _SETTLED = range(7)

# Module constants for the per-batch events: a global lookup is several times cheaper
# than an attribute of the ``Event`` enum class.
BATCH_START, UPDATE_START, BATCH_END = Event.BATCH_START, Event.UPDATE_START, Event.BATCH_END
INFERENCE_PREDICTION_END, TRAINING_END = Event.INFERENCE_PREDICTION_END, Event.TRAINING_END


class Driver:
    """Iterates the lifecycle and does the work between events; see the module docstring.

    The attributes below are set by ``TrainingLoop``; they are declared here so the
    driver reads as a whole.
    """

    _engine: Engine
    _step: Step
    _plain_step: bool
    _plain_batch: bool
    _loss_fn: LossFn
    _metrics: list[Metric]
    _fit_training: Iterable[Any]
    _fit_validation: Iterable[Any] | None
    _fit_callbacks: list[CallbackLike]
    _resume: ResumePoint | None
    _move: Callable[[Any], Any]
    _phase_ran: bool
    _validation_proposed: bool
    _next_epoch: int
    _next_batch: int
    _phase_rng: dict[str, Any] | None
    _keep_phase_rng: bool
    _final_metrics: dict[str, float] | None
    model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    device: torch.device
    collective: Collective | None
    history: History
    epoch_count: int
    epoch_index: int
    batch_index: int
    batch_count: int | None
    batches_run: int
    is_training: bool
    resuming: bool
    stop_reason: str | None
    last_step_input: Any
    last_step_target: Any
    last_step_output: Any
    last_step_loss: torch.Tensor | None
    autocast: Callable[[], AbstractContextManager[Any]] | None
    grad_scaler: torch.amp.GradScaler | None

    @property
    def metrics(self) -> dict[str, float]:
        """The current phase's metric values (see ``TrainingLoop.metrics``)."""
        raise NotImplementedError

    @property
    def _as_loop(self) -> TrainingLoop:
        """This driver as the ``TrainingLoop`` it always is, for the resume helpers."""
        return cast("TrainingLoop", self)

    def _run_fit(self) -> None:
        propose = self._engine.propose
        resume, self._resume = self._resume, None
        if propose(Event.FIT_START) is None:
            return
        first_epoch = 0
        if resume is not None:
            resume.restore_after_fit_start(self._as_loop)
            first_epoch = resume.next_epoch
            if resume.stop_reason is not None:  # the interrupted run was stopping here
                self.resuming, self.stop_reason = False, resume.stop_reason
                raise Stopping
            if not resume.mid_phase:
                resume.restore_rng(self._as_loop)
                self.resuming, resume = False, None
        for epoch_index in range(first_epoch, self.epoch_count):
            self.epoch_index = self._next_epoch = epoch_index
            taken = propose(Event.EPOCH_START)
            if taken is Event.FIT_END:
                return
            if taken is Event.EPOCH_START:
                self._run_epoch(resume)
            elif resume is not None:
                raise _reentry_refused(Event.EPOCH_START)
            else:
                self._next_epoch = epoch_index + 1  # a vetoed epoch still counts
            resume = None
        propose(Event.FIT_END)

    def _run_epoch(self, resume: ResumePoint | None) -> None:
        propose = self._engine.propose
        self._validation_proposed = False  # set by the validation entry, whoever proposes it
        taken: Event | None = None
        if resume is None or resume.state == "training":
            taken = propose(Event.TRAINING_START)
            if taken is Event.EPOCH_END:
                return
            if taken is Event.TRAINING_START:
                self._run_phase(self._fit_training, Event.TRAINING_END, self._training_step, resume)
            elif resume is not None:
                raise _reentry_refused(Event.TRAINING_START)
            resume = None
        if self._fit_validation is not None and not self._validation_proposed:
            taken = propose(Event.VALIDATION_START)
            if taken is Event.EPOCH_END:
                return
        if taken is Event.VALIDATION_START:
            assert self._fit_validation is not None
            self._run_phase(
                self._fit_validation, Event.VALIDATION_END, self._validation_step, resume
            )
        elif resume is not None:
            raise _reentry_refused(Event.VALIDATION_START)
        propose(Event.EPOCH_END)

    def _run_phase(
        self,
        data: Iterable[Any],
        end: Event,
        step: Callable[[], None],
        resume: ResumePoint | None,
    ) -> None:
        first = 0
        if resume is None:
            # Only a hook can take a checkpoint inside the phase, which needs this
            # snapshot; a fit whose hooks never run there skips it (~25 us a phase, cold).
            if self._keep_phase_rng:
                self._phase_rng = phase_start_rng(data)
        else:
            data, first = self._reenter_phase(data, resume), resume.next_batch
        plain = self._plain_batch and self.autocast is None and self.grad_scaler is None
        if plain and end is TRAINING_END:
            moves = self._engine.bare_moves((BATCH_START, UPDATE_START), self._engine.model.state)
            if moves is not None:
                self._run_plain_training(data, first, moves)
                return
        propose = self._engine.propose
        split = self._step.split
        machine = self._engine.model
        batch_state = self._engine.destination(BATCH_START, machine.state)
        for batch_index, batch in enumerate(data, first):
            # A batch was fetched, drawing from the data's random generators: no exact
            # checkpoint until this batch ends (see loop_state.capture).
            self._next_batch = MID_BATCH
            self.batch_index = batch_index
            # Held through this batch's step: the last graph's nodes (backward already
            # freed their saved tensors) keep the parameters' gradient accumulators
            # alive, so autograd reuses them instead of building new ones every batch.
            previous_loss = self.last_step_loss
            self.last_step_output = self.last_step_loss = None  # never stale across batches
            self.last_step_input, self.last_step_target = split(self._move(batch))
            try:
                taken = propose(BATCH_START)
            except BaseException:
                if machine.state == batch_state:  # taken, then an observer stopped or raised
                    self.batches_run += 1
                raise
            if taken is BATCH_START:
                self._phase_ran = True
                self.batches_run += 1
                step()
                del previous_loss
                self._next_batch = batch_index + 1
                propose(BATCH_END)
            elif taken is end:
                return
        self._next_batch = MID_BATCH  # exhausting the iterator may have drawn too
        propose(end)

    def _run_plain_training(self, data: Iterable[Any], first: int, moves: tuple[str, ...]) -> None:
        """A training phase whose batches no guard or observer can interrupt before ``batch_end``.

        The same work as the general loop with the default :class:`Step` and
        ``_training_step``, for the common case where no callback hooks
        ``batch_start`` or ``update_start``: their proposals could only move the
        machine, so the loop calls model, loss and optimizer inline and keeps its
        progress through a batch in a local ``stage``. What hooks read — the machine's
        state, ``batch_index``, ``last_step_*``, ``batches_run`` — is written only
        where a hook can run: before a hooked ``batch_end``, when the phase ends, and
        when anything raises (:meth:`_settle_plain`), so each hook, the wind-down
        included, sees what the general loop would show.
        ``batch_end`` is proposed when a guard hooks it; with observers only, the
        loop moves the machine and calls them (:meth:`Engine.observer_call`), a lone
        observer directly.
        """
        assert self.model is not None
        engine, machine = self._engine, self._engine.model
        propose = engine.propose
        phase_state = machine.state
        batch_state, update_state = moves
        end = engine.observed_move(BATCH_END, update_state)
        guarded = end is None  # then batch_end is proposed, and its guards run
        observers = None
        if end is None:  # where the proposal will lead, read off the machine all the same
            end_state = engine.destination(BATCH_END, update_state)
            assert end_state is not None  # batch_end always leaves updating
        else:
            end_state, observers = end
        hooked = guarded or observers is not None
        observe_end, settle_end = observers or (_unobserved, _unobserved)
        states = (phase_state, batch_state, update_state, end_state)
        model, loss_fn, optimizer = self.model, self._loss_fn, self.optimizer
        metrics, tensor = self._metrics, torch.Tensor
        split, backward = self._step.split, torch.autograd.backward
        move, pairs = self._move, (list, tuple)  # DataLoader yields lists
        base = self.batches_run
        runs_before = base - first + 1  # + batch_index: batches_run once that batch started
        # The locals hold the previous values until this phase's first batch replaces
        # them; the attributes let go of the previous phase's output and graph now.
        inputs, target = self.last_step_input, self.last_step_target
        output, loss = self.last_step_output, self.last_step_loss
        self.last_step_output = self.last_step_loss = None
        batch_index, stage = first - 1, _ENDED
        try:
            for batch_index, batch in enumerate(data, first):
                stage = _FETCHED
                if move is not _unchanged:
                    batch = move(batch)
                    move = self._move
                if type(batch) in pairs and len(batch) == 2:
                    inputs, target = batch
                else:
                    inputs, target = split(batch)
                stage = _STARTED
                # ``loss`` keeps the last graph until the new loss replaces it (see
                # _run_phase), as in a hand-written loop.
                output = model(inputs)
                stage = _FORWARDED
                loss = loss_fn(output, target)
                if type(loss) is not tensor or loss.ndim:
                    loss = checked_loss(loss)  # raises the ConfigError that says what is wrong
                stage = _SCORED
                backward(loss)
                stage = _UPDATING
                optimizer.step()
                optimizer.zero_grad()
                if type(target) is tensor:
                    try:
                        size = target.shape[0]
                    except IndexError:  # a 0-d target
                        size = self._step.batch_size(inputs, target)
                else:
                    size = self._step.batch_size(inputs, target)
                for metric in metrics:
                    metric.update(output, target, loss, size)
                stage = _ENDED
                if hooked:  # what _settle_plain writes at _ENDED, inline: it runs per batch
                    self.batch_index = batch_index
                    self.last_step_input, self.last_step_target = inputs, target
                    self.last_step_output, self.last_step_loss = output, loss
                    self._phase_ran = True
                    self.batches_run = runs_before + batch_index
                    self._next_batch = batch_index + 1
                    stage = _SETTLED
                    if guarded:  # the proposal takes batch_end from updating
                        engine.source, machine.state = batch_state, update_state
                        propose(BATCH_END)
                    else:
                        engine.source, machine.state = update_state, end_state
                        result = observe_end()
                        if result is not None and settle_end(result) is not None:
                            raise Stopping
                    # Held through the next batch, output and loss would keep this
                    # batch's graph alive past the next one's (slowing every
                    # allocation); the locals still have them for _settle_plain.
                    stage = _ENDED
                    self.last_step_output = self.last_step_loss = None
        except BaseException:
            if stage != _SETTLED:
                ran = batch_index - first + (stage != _FETCHED)
                self._settle_plain(
                    stage, batch_index, ran, base, states, inputs, target, output, loss
                )
            raise
        if stage != _SETTLED:
            ran = batch_index - first + 1
            self._settle_plain(stage, batch_index, ran, base, states, inputs, target, output, loss)
        self._next_batch = MID_BATCH
        propose(TRAINING_END)

    def _settle_plain(
        self,
        stage: int,
        batch_index: int,
        ran: int,
        base: int,
        states: tuple[str, str, str, str],
        inputs: Any,
        target: Any,
        output: Any,
        loss: torch.Tensor | None,
    ) -> None:
        """Write what the general loop would show at ``stage`` of the plain loop's batch.

        ``batch_index`` is the loop's local index (of the last batch fetched);
        ``ran`` counts the batches this loop started, the current one included once
        it started; ``base`` is ``batches_run`` before the loop. The values are the
        loop's locals: the current batch's from the stage that produced them on, the
        previous batch's (or the attributes' before the loop) until then.
        """
        phase_state, batch_state, update_state, end_state = states
        self.last_step_input, self.last_step_target = inputs, target
        self.last_step_output = None if stage < _FORWARDED else output
        self.last_step_loss = None if stage < _SCORED else loss
        if stage == _ENDED and ran == 0:  # no batch was fetched: nothing else moved
            return
        self.batch_index = batch_index
        self._next_batch = batch_index + 1 if stage == _ENDED else MID_BATCH
        if ran:
            self._phase_ran = True
            self.batches_run = base + ran
        engine, machine = self._engine, self._engine.model
        if stage in (_STARTED, _FORWARDED, _SCORED):
            engine.source, machine.state = phase_state, batch_state
        elif stage == _UPDATING:
            engine.source, machine.state = batch_state, update_state
        elif ran:  # fetched, or ended: the batch before (or this one) has ended
            engine.source, machine.state = update_state, end_state

    def _reenter_phase(self, data: Iterable[Any], resume: ResumePoint) -> Iterable[Any]:
        """Restore the phase's state after its re-entered start; the data from the next batch."""
        resume.restore_phase(self._as_loop)
        self._next_batch = resume.next_batch
        self.resuming = False
        phase_rng = resume.rank_state(self._as_loop)["phase_rng"]
        if phase_rng is None:  # taken at the phase start, before its iterator existed
            resume.restore_rng(self._as_loop)
            self._phase_rng = phase_start_rng(data)
            return data
        self._phase_rng = phase_rng
        restore_phase_start_rng(data, phase_rng)
        return resumed_data(data, resume.next_batch, lambda: resume.restore_rng(self._as_loop))

    def _training_step(self) -> None:
        step, inputs, target = self._step, self.last_step_input, self.last_step_target
        assert self.model is not None
        if self.autocast is None:
            if self._plain_step:  # the default Step: skip two method calls per batch
                output = self.last_step_output = self.model(inputs)
                loss = self._loss_fn(output, target)
            else:
                output = self.last_step_output = step.forward(self.model, inputs)
                loss = step.loss(self._loss_fn, output, target)
        else:
            with self.autocast():
                output = self.last_step_output = step.forward(self.model, inputs)
                loss = step.loss(self._loss_fn, output, target)
        if type(loss) is not torch.Tensor or loss.ndim:
            loss = checked_loss(loss)  # raises the ConfigError that says what is wrong
        self.last_step_loss = loss
        scaler = self.grad_scaler
        torch.autograd.backward(loss if scaler is None else scaler.scale(loss))
        if self._engine.propose(UPDATE_START) is UPDATE_START:
            if scaler is None:
                self.optimizer.step()
            else:
                scaler.step(self.optimizer)
                scaler.update()
            self.optimizer.zero_grad()
        size = step.batch_size(inputs, target)
        for metric in self._metrics:
            metric.update(output, target, loss, size)

    def _validation_step(self) -> None:
        step, inputs, target = self._step, self.last_step_input, self.last_step_target
        assert self.model is not None
        with self.autocast() if self.autocast is not None else nullcontext():
            output = self.last_step_output = step.forward(self.model, inputs)
            if self._engine.propose(INFERENCE_PREDICTION_END) is None:
                return
            loss = step.loss(self._loss_fn, output, target)
        loss = self.last_step_loss = checked_loss(loss)
        size = step.batch_size(inputs, target)
        for metric in self._metrics:
            metric.update(output, target, loss, size)

    # -- entry work: done when the event is proposed, whoever proposes it --------------

    def _open_phase(self, training: bool, data: Iterable[Any]) -> None:
        assert self.model is not None
        self.is_training = training
        self.batch_index = 0
        self.batch_count = length_of(data)
        self.model.train(training)
        torch.set_grad_enabled(training)
        set_sampler_epoch(data, self.epoch_index)
        self._final_metrics = None
        for metric in self._metrics:
            metric.reset()
        self._phase_ran = False
        self.batches_run = 0
        self._next_batch, self._phase_rng = 0, None
        self._move = self._first_move

    def _open_training(self) -> None:
        self._open_phase(True, self._fit_training)
        self.optimizer.zero_grad()

    def _open_validation(self) -> None:
        assert self._fit_validation is not None
        self._validation_proposed = True
        self._open_phase(False, self._fit_validation)

    def _close_phase(self) -> None:
        if not self._phase_ran:
            return
        self._phase_ran = False
        if self.collective is None:
            self._final_metrics = self.metrics
        else:
            self._final_metrics = self.collective.global_metrics(self._metrics)
        entry: dict[str, float] = {**self._final_metrics, "epoch": self.epoch_index}
        (self.history.training if self.is_training else self.history.validation).append(entry)

    def _close_epoch(self) -> None:
        self._next_epoch = self.epoch_index + 1

    def _first_move(self, batch: Any) -> Any:
        """Decide, on a phase's first batch, whether batches need moving at all."""
        if needs_move(batch, self.device):
            non_blocking = self.device.type == "cuda"
            device = self.device

            def move(batch: Any) -> Any:
                return move_to_device(batch, device, non_blocking)

            self._move = move
            return move(batch)
        self._move = _unchanged
        return batch


def _unchanged(batch: Any) -> Any:
    return batch


def _unobserved(*_: object) -> None:
    """Stands in for the observers of an event that nothing observes (never settled)."""


def _reentry_refused(event: Event) -> LifecycleError:
    return LifecycleError(
        f"Resuming needs {event.value!r} to be taken to re-enter the saved state, but a "
        "guard refused it; guards can read loop.resuming to let re-entry events pass."
    )

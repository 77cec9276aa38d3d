"""Property tests of the lifecycle invariants (lifecycle.md, "Invariants"), issue 2.

Random run shapes x random decision scripts (vetoes, redirects legal and illegal,
stops and raises, from guards and observers, on any event), through both engines:

* invariants 1-4 and 6 by ``assert_valid_trace``, plus what the test alone knows
  (batch counts, the decisions' contract, History, how exceptions come out);
* invariant 5 by a guard that snapshots the parameters before ``optimizer.step()``;
* invariant 8 by running every example through both engines and comparing all of it;
* a scripted raise is re-raised as the same object, after a wind-down whose exact
  trace is composed from the contract.

The checker itself is tested on broken traces in ``test_machine_stateful.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import hypothesis
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from statemachine_loop import Callback, DecisionKind, Event, LoopError, Redirect, Stop, Veto
from statemachine_loop.events import END_EVENTS
from statemachine_loop.testing.recorder import TraceEntry, TraceRecorder
from statemachine_loop.testing.strategies import (
    Raise,
    RunShape,
    ScriptedError,
    ScriptStep,
    decision_scripts,
    run_shapes,
    scripted_callbacks,
    tiny_loop,
)
from statemachine_loop.trace import assert_valid_trace, replay

E = Event
EngineName = Literal["compiled", "transitions"]
ENGINES: tuple[EngineName, ...] = ("compiled", "transitions")
_OPENS = {E.FIT_START: E.FIT_END, E.EPOCH_START: E.EPOCH_END, E.TRAINING_START: E.TRAINING_END}
_OPENS |= {E.VALIDATION_START: E.VALIDATION_END, E.BATCH_START: E.BATCH_END}
#: The contract's redirect table; (epoch, validation_start) follows its general rule
#: "an event legal from the current state that the loop can actually perform".
CONTRACT_REDIRECTS = {
    ("fit", E.EPOCH_START): {E.FIT_END},
    ("epoch", E.TRAINING_START): {E.VALIDATION_START, E.EPOCH_END},
    ("epoch", E.VALIDATION_START): {E.EPOCH_END},
    ("training", E.BATCH_START): {E.TRAINING_END},
    ("training_batch", E.UPDATE_START): {E.BATCH_END},
    ("trained", E.VALIDATION_START): {E.EPOCH_END},
    ("validation", E.BATCH_START): {E.VALIDATION_END},
    ("validation_batch", E.INFERENCE_PREDICTION_END): {E.BATCH_END},
}


#: Always-run examples: a redirect conflict; a redirect outranking a later veto and a
#: stop outranking a later veto (callback order must not matter); an illegal redirect.
CONTESTS = [
    [
        ScriptStep(0, "guard", E.TRAINING_START, 2, Redirect(E.VALIDATION_START, "a")),
        ScriptStep(1, "guard", E.TRAINING_START, 2, Redirect(E.EPOCH_END, "b")),
    ],
    [
        ScriptStep(0, "guard", E.BATCH_START, 2, Redirect(E.TRAINING_END, "a")),
        ScriptStep(1, "guard", E.BATCH_START, 2, Veto("b")),
        ScriptStep(0, "guard", E.BATCH_START, 3, Stop("c")),
        ScriptStep(1, "guard", E.BATCH_START, 3, Veto("d")),
    ],
    [ScriptStep(1, "guard", E.BATCH_START, 2, Redirect(E.VALIDATION_END, "a"))],
]
CONTEST_SHAPE = RunShape(epochs=2, training_batches=3, validation_batches=1)


def ordinary_trace(shape: RunShape) -> list[Event]:
    """The contract's ordinary fit, composed per scope."""
    training = [
        E.TRAINING_START,
        *[E.BATCH_START, E.UPDATE_START, E.BATCH_END] * shape.training_batches,
        E.TRAINING_END,
    ]
    validation = [
        E.VALIDATION_START,
        *[E.BATCH_START, E.INFERENCE_PREDICTION_END, E.BATCH_END] * shape.validation_batches,
        E.VALIDATION_END,
    ]
    epoch = [E.EPOCH_START, *training, *(validation if shape.has_validation else []), E.EPOCH_END]
    return [E.FIT_START, *epoch * shape.epochs, E.FIT_END]


def wound_down(prefix: Sequence[Event]) -> list[Event]:
    """``prefix`` then the end of every scope it left open, innermost first."""
    stack: list[Event] = []
    for event in prefix:
        if event in _OPENS:
            stack.append(_OPENS[event])
        elif event in END_EVENTS:
            assert stack.pop() is event
    return [*prefix, *reversed(stack)]


def bits(model: torch.nn.Module) -> list[bytes]:
    return [p.detach().numpy().tobytes() for p in model.parameters()]


@attrs.frozen
class Outcome:
    entries: list[TraceEntry]
    raised: list[ScriptedError]
    fired: list[ScriptStep]
    error: BaseException | None
    loop: Any
    params: list[bytes]


class BatchesRunCheck(Callback):
    """At every phase end, ``loop.batches_run`` is the number of the phase's batch_end events."""

    def __init__(self, recorder: TraceRecorder) -> None:
        self.recorder = recorder
        self.checked = 0

    def on_training_end(self, loop: Any) -> None:
        self._check(loop, E.TRAINING_START)

    def on_validation_end(self, loop: Any) -> None:
        self._check(loop, E.VALIDATION_START)

    def _check(self, loop: Any, start: Event) -> None:
        events = [entry.event for entry in self.recorder.entries]
        opened = len(events) - 1 - events[::-1].index(start)
        assert loop.batches_run == events[opened:].count(E.BATCH_END)
        self.checked += 1


def run(shape: RunShape, script: Sequence[ScriptStep], engine: EngineName) -> Outcome:
    """Fit once, the recorder first: it records each taken event before any scripted
    observer of it can stop or raise."""
    raised: list[ScriptedError] = []
    scripted = scripted_callbacks(script, raised=raised)
    recorder = TraceRecorder()
    loop, model = tiny_loop(shape, [recorder, BatchesRunCheck(recorder), *scripted], engine)
    error: BaseException | None = None
    try:
        loop.fit(model, shape.epochs)
    except Exception as exc:
        error = exc
    fired = [step for callback in scripted for step in callback.fired]
    return Outcome(recorder.entries, raised, fired, error, loop, bits(model))


def check_exception(out: Outcome) -> None:
    loop, error = out.loop, out.error
    if out.raised:
        assert error is not None, "a hook raised but fit returned"
    if error is None:
        assert loop.failure is None
        return
    assert loop.failure is error
    if isinstance(error, ScriptedError):
        assert error is out.raised[0], "fit must re-raise the first exception, unchanged"
        later = out.raised[1:]
    else:
        assert isinstance(error, LoopError), f"unexpected {error!r}"
        later = out.raised
    notes = "\n".join(getattr(error, "__notes__", []))
    for other in later:
        assert str(other) in notes, f"{other!r} was not attached to {error!r}"


def check_decisions(out: Outcome, shape: RunShape) -> None:
    loop = out.loop
    decided = [
        (f"scripted{s.slot}", s.action.reason) for s in out.fired if not isinstance(s.action, Raise)
    ]
    for record in loop.decisions:
        assert (record.callback, record.reason) in decided, record
        if record.applied:
            assert record.ignored_because is None, record
        elif record.ignored_because == "refused":  # the loop raised for this proposal
            assert isinstance(out.error, LoopError), record
        elif record.ignored_because == "failure":  # a later guard of the proposal raised
            assert out.error is not None and not record.from_observer, record
        else:
            assert record.ignored_because in ("outranked", "wind-down"), record
        if record.from_observer:
            assert record.kind is DecisionKind.STOP, record
        if record.applied and record.kind is not DecisionKind.STOP:
            assert record.event not in END_EVENTS, record
        if record.applied and record.kind is DecisionKind.REDIRECT:
            assert record.target in CONTRACT_REDIRECTS[record.state, record.event], record
            assert record.target is not E.VALIDATION_START or shape.has_validation
    if out.error is None:  # every decision returned was valid, so every one is recorded
        assert sorted(decided) == sorted((r.callback, r.reason) for r in loop.decisions)
    stops = [r for r in loop.decisions if r.kind is DecisionKind.STOP and r.applied]
    assert loop.stop_reason == (stops[0].reason if stops else None)
    for entry in out.entries:
        assert entry.stop_reason in (None, loop.stop_reason)


def check_history(out: Outcome) -> None:
    """One History entry per phase that ran a batch; an observer's Stop or raise at a
    batch_start means that batch did no work (the run ends there)."""
    aborted = any(s.hook == "observer" and s.event is E.BATCH_START for s in out.fired)
    starts = [i for i, e in enumerate(out.entries) if e.event is E.BATCH_START]
    worked = set(starts[:-1] if aborted else starts)
    ran: dict[bool, list[int]] = {True: [], False: []}
    phase_worked = False
    for i, entry in enumerate(out.entries):
        phase_worked = phase_worked or i in worked
        if entry.event in (E.TRAINING_END, E.VALIDATION_END):
            if phase_worked:
                ran[entry.event is E.TRAINING_END].append(entry.epoch_index)
            phase_worked = False
    history = out.loop.history
    assert [h["epoch"] for h in history.training] == ran[True]
    assert [h["epoch"] for h in history.validation] == ran[False]


@pytest.mark.parametrize("engine", ENGINES)
@given(shape=run_shapes(), script=decision_scripts())
@example(shape=CONTEST_SHAPE, script=CONTESTS[0])
@example(shape=CONTEST_SHAPE, script=CONTESTS[1])
@example(shape=CONTEST_SHAPE, script=CONTESTS[2])
def test_random_runs_keep_the_invariants(
    engine: EngineName, shape: RunShape, script: list[ScriptStep]
) -> None:
    out = run(shape, script, engine)
    ended = type(out.error).__name__ if out.error else "stop" if out.loop.stop_reason else "-"
    hypothesis.event(f"ended by {ended}")
    hypothesis.event(f"decisions applied: {min(3, sum(r.applied for r in out.loop.decisions))}")
    assert_valid_trace(out.entries, has_validation=shape.has_validation, epoch_count=shape.epochs)
    for entry in out.entries:
        if entry.event is E.BATCH_START:
            limit = shape.training_batches if entry.is_training else shape.validation_batches
            assert entry.batch_index < limit, entry
    events = [entry.event for entry in out.entries]
    assert out.loop.state == (replay(events)[-1] if events else "idle")
    check_exception(out)
    check_decisions(out, shape)
    check_history(out)


class ParamWatch(Callback):
    """Vetoes the chosen ``update_start`` calls and checks, at each training batch_end,
    that the parameters changed exactly when the optimizer stepped, and never when
    update_start was not taken (invariant 5). Problems are collected, not raised, since
    the loop would attach an exception from a hook during a wind-down as a note."""

    def __init__(self, model: torch.nn.Module, vetoes: set[int]) -> None:
        self.model, self.vetoes, self.calls = model, vetoes, 0
        self.snapshot: list[bytes] | None = None
        self.taken = self.vetoed = False
        self.steps = self.checked_vetoes = 0
        self.problems: list[str] = []

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_post_hook(lambda *_: setattr(self, "steps", self.steps + 1))

    def guard_update_start(self, loop: Any) -> Veto | None:
        self.calls += 1
        self.snapshot, self.steps = bits(self.model), 0
        self.vetoed = self.calls in self.vetoes
        return Veto("watch") if self.vetoed else None

    def on_update_start(self, loop: Any) -> None:
        self.taken = True

    def on_batch_end(self, loop: Any) -> None:
        if self.snapshot is None:
            return
        changed = bits(self.model) != self.snapshot
        where = f"update_start #{self.calls} (taken={self.taken}, vetoed={self.vetoed})"
        if changed != (self.steps > 0) or self.steps > 1:
            self.problems.append(f"{where}: {self.steps} steps but changed={changed}")
        if (not self.taken or self.vetoed) and (changed or self.steps):
            self.problems.append(f"{where}: not taken, yet the parameters moved")
        self.checked_vetoes += self.vetoed
        self.snapshot, self.taken, self.vetoed = None, False, False


def watched_run(
    shape: RunShape, script: list[ScriptStep], engine: EngineName, vetoes: set[int]
) -> Any:
    raised: list[ScriptedError] = []
    recorder = TraceRecorder()
    loop, model = tiny_loop(shape, engine=engine)
    watch = ParamWatch(model, vetoes)
    watch.hook_optimizer(loop.optimizer)
    loop.callbacks = [recorder, watch, *scripted_callbacks(script, raised=raised)]
    with contextlib.suppress(ScriptedError, LoopError):
        loop.fit(model, shape.epochs)
    assert watch.problems == []
    return watch


@pytest.mark.parametrize("engine", ENGINES)
@given(shape=run_shapes(), script=decision_scripts(), vetoes=st.sets(st.integers(1, 12)))
def test_a_vetoed_update_leaves_every_parameter_unchanged(
    engine: EngineName, shape: RunShape, script: list[ScriptStep], vetoes: set[int]
) -> None:
    watched_run(shape, script, engine, vetoes)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_parameter_watch_checks_every_vetoed_update(engine: EngineName) -> None:
    shape = RunShape(epochs=2, training_batches=4, validation_batches=1)
    watch = watched_run(shape, [], engine, vetoes={1, 3, 4, 8})
    assert (watch.calls, watch.checked_vetoes) == (8, 4)


@given(shape=run_shapes(), script=decision_scripts())
@example(shape=CONTEST_SHAPE, script=CONTESTS[0])
@example(shape=CONTEST_SHAPE, script=CONTESTS[1])
def test_both_engines_run_the_same_lifecycle(shape: RunShape, script: list[ScriptStep]) -> None:
    compiled, reference = (run(shape, script, engine) for engine in ENGINES)
    assert compiled.entries == reference.entries
    assert compiled.loop.decisions == reference.loop.decisions
    assert compiled.fired == reference.fired
    assert type(compiled.error) is type(reference.error)
    assert str(compiled.error) == str(reference.error)
    notes = [getattr(out.error, "__notes__", []) for out in (compiled, reference)]
    assert notes[0] == notes[1]
    assert type(compiled.loop.failure) is type(reference.loop.failure)
    assert compiled.loop.stop_reason == reference.loop.stop_reason
    assert compiled.loop.state == reference.loop.state
    # repr, so that a nan metric (a phase whose every prediction was vetoed) compares equal
    assert repr(compiled.loop.history) == repr(reference.loop.history)
    assert compiled.params == reference.params


@st.composite
def single_raises(draw: st.DrawFn) -> tuple[RunShape, ScriptStep, int, list[Event]]:
    """A shape, a raise at an event that an ordinary fit of that shape takes, and the
    expected trace: the ordinary one broken off there (the event kept if an observer
    raised, since the machine took it), then wound down."""
    shape = draw(run_shapes())
    ordinary = ordinary_trace(shape)
    index = draw(st.integers(0, len(ordinary) - 1))
    hooks: tuple[Literal["guard", "observer"], ...] = ("guard", "observer")
    event, hook = ordinary[index], draw(st.sampled_from(hooks))
    occurrence = ordinary[: index + 1].count(event)
    prefix = ordinary[: index + 1] if hook == "observer" else ordinary[:index]
    step = ScriptStep(0, hook, event, occurrence, Raise("boom"))
    return shape, step, len(prefix), wound_down(prefix)


@pytest.mark.parametrize("engine", ENGINES)
@given(case=single_raises())
def test_a_raise_is_reraised_unchanged_after_the_wind_down(
    engine: EngineName, case: tuple[RunShape, ScriptStep, int, list[Event]]
) -> None:
    shape, step, before, expected = case
    raised: list[ScriptedError] = []
    recorder = TraceRecorder()
    loop, model = tiny_loop(shape, [recorder, *scripted_callbacks([step], raised=raised)], engine)
    with pytest.raises(ScriptedError) as info:
        loop.fit(model, shape.epochs)
    assert len(raised) == 1 and info.value is raised[0]
    assert loop.failure is info.value and loop.stop_reason is None
    assert recorder.events == expected
    assert recorder.events.count(E.FIT_END) == (1 if expected else 0)
    # Entries recorded after the failure (the wind-down) say so; those before do not.
    flags = [entry.failed for entry in recorder.entries]
    assert flags == [False] * before + [True] * (len(expected) - before)
    assert_valid_trace(recorder.entries, has_validation=shape.has_validation)

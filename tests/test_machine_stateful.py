"""The lifecycle machine and the trace checker, against the contract.

Stateful tests fire random events, legal or not, at the lifecycle machine. The
expectation is the contract's transition table, copied here from lifecycle.md
("States and transitions") by hand, so the machine that ``build_machine`` returns is
compared with the contract rather than with itself. A second state machine drives both
engines (no hooks) in lockstep with the contract.

Then ``assert_valid_trace`` is fed broken traces, each of which the contract forbids,
so the property tests that rely on it (``test_properties.py``) can fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from transitions import MachineError

from statemachine_loop import trace as trace_checker
from statemachine_loop.callback import collect_hooks
from statemachine_loop.decisions import Stop
from statemachine_loop.dispatch import CompiledEngine, TransitionsEngine
from statemachine_loop.errors import LifecycleError
from statemachine_loop.events import Event
from statemachine_loop.machine import MachineModel, build_machine, wind_down_paths
from statemachine_loop.run_state import RunState
from statemachine_loop.testing.recorder import TraceEntry, TraceRecorder
from statemachine_loop.testing.strategies import RunShape, ScriptStep, scripted_callbacks, tiny_loop
from statemachine_loop.trace import TraceViolation, assert_valid_trace, replay

E = Event
#: lifecycle.md, "States and transitions": (state, event) -> destination.
CONTRACT: dict[tuple[str, Event], str] = {
    ("idle", E.FIT_START): "fit",
    ("fit", E.EPOCH_START): "epoch",
    ("epoch", E.TRAINING_START): "training",
    ("training", E.BATCH_START): "training_batch",
    ("validation", E.BATCH_START): "validation_batch",
    ("training_batch", E.UPDATE_START): "updating",
    ("validation_batch", E.INFERENCE_PREDICTION_END): "predicted",
    ("updating", E.BATCH_END): "training",
    ("training_batch", E.BATCH_END): "training",
    ("predicted", E.BATCH_END): "validation",
    ("validation_batch", E.BATCH_END): "validation",
    ("training", E.TRAINING_END): "trained",
    ("trained", E.VALIDATION_START): "validation",
    ("epoch", E.VALIDATION_START): "validation",
    ("validation", E.VALIDATION_END): "validated",
    ("trained", E.EPOCH_END): "fit",
    ("validated", E.EPOCH_END): "fit",
    ("epoch", E.EPOCH_END): "fit",
    ("fit", E.FIT_END): "done",
}
STATES = sorted({state for state, _ in CONTRACT} | set(CONTRACT.values()))
#: lifecycle.md, "Events": the scope ends, the only events a wind-down may fire.
ENDS = {E.FIT_END, E.EPOCH_END, E.TRAINING_END, E.VALIDATION_END, E.BATCH_END}


def legal(state: str) -> list[Event]:
    return [event for event in Event if (state, event) in CONTRACT]


def end_walk(state: str) -> list[Event]:
    """The contract's way home from ``state`` by end events alone (breadth-first)."""
    paths: dict[str, list[Event]] = {"done": []}
    frontier = ["done"]
    while frontier:
        dest = frontier.pop(0)
        for (source, event), to in CONTRACT.items():
            if to == dest and event in ENDS and source not in paths:
                paths[source] = [event, *paths[dest]]
                frontier.append(source)
    return paths.get(state, [])


def test_the_machine_has_the_contracts_states_and_only_event_triggers() -> None:
    model = MachineModel()
    machine = build_machine(model)
    assert set(machine.states) == set(STATES) and len(STATES) == 12
    assert set(machine.events) == {event.value for event in Event}
    assert not [name for name in dir(model) if name.startswith("to_")]  # no auto transitions
    assert machine.get_state("done").final
    assert model.state == "idle"


class LifecycleMachine(RuleBasedStateMachine):
    """Fires any of the twelve events at the machine; compares every move with CONTRACT."""

    def __init__(self) -> None:
        super().__init__()
        self.model = MachineModel()
        self.machine = build_machine(self.model)
        self.paths = wind_down_paths(self.machine)
        self.expected = "idle"
        self.scratch = MachineModel()
        self.scratch_machine = build_machine(self.scratch)

    @rule(event=st.sampled_from(list(Event)))
    def fire_any(self, event: Event) -> None:
        before = self.model.state
        if (before, event) in CONTRACT:
            assert self.model.trigger(event.value) is True  # type: ignore[attr-defined]
            self.expected = CONTRACT[before, event]
        else:
            with pytest.raises(MachineError):
                self.model.trigger(event.value)  # type: ignore[attr-defined]
        assert self.model.state == self.expected, (before, event)

    @precondition(lambda self: bool(legal(self.expected)))
    @rule(data=st.data())
    def fire_legal(self, data: st.DataObject) -> None:
        """Walk deeper than random events would: one the contract allows from here."""
        self.fire_any(data.draw(st.sampled_from(legal(self.expected)), label="legal event"))

    @rule(state=st.sampled_from(STATES))
    def jump(self, state: str) -> None:
        self.machine.set_state(state, model=self.model)
        self.expected = state

    @invariant()
    def done_is_final(self) -> None:
        if self.model.state == "done":
            assert legal("done") == []
            for event in Event:
                with pytest.raises(MachineError):
                    self.model.trigger(event.value)  # type: ignore[attr-defined]
            assert self.model.state == "done"

    @invariant()
    def wind_down_leads_home_by_end_events(self) -> None:
        state = self.model.state
        path = list(self.paths[state])
        assert path == end_walk(state), state
        assert set(path) <= ENDS
        model = self.scratch
        self.scratch_machine.set_state(state, model=model)
        for event in path:
            model.trigger(event.value)  # type: ignore[attr-defined]
        assert model.state == ("idle" if state == "idle" else "done")


TestLifecycleMachine = LifecycleMachine.TestCase


class EngineLockstep(RuleBasedStateMachine):
    """Proposes any event to both engines (bound with no hooks) and to the contract."""

    @initialize()
    def bind(self) -> None:
        loop, _ = tiny_loop(RunShape(1, 1, 1))
        hooks = collect_hooks([])
        self.engines: list[Any] = [CompiledEngine(), TransitionsEngine()]
        for engine in self.engines:
            engine.bind(hooks, {}, view=loop, run=RunState(), can_validate=True)
        self.expected = "idle"

    @rule(event=st.sampled_from(list(Event)))
    def propose(self, event: Event) -> None:
        dest = CONTRACT.get((self.expected, event))
        for engine in self.engines:
            if dest is None:
                with pytest.raises(LifecycleError, match=event.value):
                    engine.propose(event)
            else:
                assert engine.propose(event) is event
                assert engine.source == self.expected
        self.expected = dest or self.expected
        for engine in self.engines:
            assert engine.model.state == self.expected, engine.name
            assert engine.machine.get_model_state(engine.model).name == self.expected

    @precondition(lambda self: bool(legal(self.expected)))
    @rule(data=st.data())
    def propose_legal(self, data: st.DataObject) -> None:
        self.propose(data.draw(st.sampled_from(legal(self.expected)), label="legal event"))

    @rule()
    def wind_down(self) -> None:
        for engine in self.engines:
            assert engine.wind_down() == []
            assert engine.model.state == ("idle" if self.expected == "idle" else "done")
        self.expected = self.engines[0].model.state


TestEngineLockstep = EngineLockstep.TestCase


# -- the checker itself: it must reject what the contract forbids ----------------------

FS, FE, ES, EE = E.FIT_START, E.FIT_END, E.EPOCH_START, E.EPOCH_END
TS, TE, VS, VE = E.TRAINING_START, E.TRAINING_END, E.VALIDATION_START, E.VALIDATION_END
BS, BE, US, IPE = E.BATCH_START, E.BATCH_END, E.UPDATE_START, E.INFERENCE_PREDICTION_END
SHAPE = RunShape(epochs=2, training_batches=2, validation_batches=1)
#: lifecycle.md's ordinary fit for SHAPE, composed per scope.
ORDINARY = [FS, *[ES, TS, *[BS, US, BE] * 2, TE, VS, BS, IPE, BE, VE, EE] * 2, FE]


def recorded(script: Sequence[ScriptStep] = ()) -> list[TraceEntry]:
    recorder = TraceRecorder()
    loop, model = tiny_loop(SHAPE, [recorder, *scripted_callbacks(script)])
    loop.fit(model, SHAPE.epochs)
    return recorder.entries


def violation(entries: Sequence[Any], **options: Any) -> TraceViolation:
    with pytest.raises(TraceViolation) as info:
        assert_valid_trace(entries, **options)
    return info.value


def edit(
    entries: list[TraceEntry], start: int, stop: int | None = None, **changes: Any
) -> list[TraceEntry]:
    """``entries`` with ``changes`` made to those in ``[start, stop)`` (one if no stop)."""
    stop = start + 1 if stop is None else stop
    return [attrs.evolve(e, **changes) if start <= i < stop else e for i, e in enumerate(entries)]


def test_the_checker_accepts_ordinary_and_empty_traces() -> None:
    entries = recorded()
    assert [entry.event for entry in entries] == ORDINARY
    assert_valid_trace(entries, has_validation=True, epoch_count=2)
    assert_valid_trace([entry.event.value for entry in entries], has_validation=True)
    assert_valid_trace([])
    assert replay([FS, ES, EE, FE]) == ["fit", "epoch", "fit", "done"]


def test_a_violation_names_the_event_its_position_the_state_and_the_legal_events() -> None:
    error = violation([FS, ES, BS])
    assert (error.rule, error.index, error.event, error.state) == (1, 2, BS, "epoch")
    assert set(error.legal) == {TS, VS, EE}  # the contract's table, from state epoch
    for part in ("#2 'batch_start'", "state 'epoch'", "training_start", "fit_start epoch_start"):
        assert part in str(error)
    with pytest.raises(TraceViolation, match="#1 'fit_start'"):
        replay([FS, FS])


@pytest.mark.parametrize(
    ("trace", "options", "number", "index"),
    [
        ([FS, ES], {}, 1, 2),  # stops short of done
        ([FS, "fit_finish"], {}, 1, 1),
        ([ES], {}, 1, 0),
        ([*ORDINARY, FS], {}, 1, len(ORDINARY)),
        (ORDINARY, {"has_validation": False}, 2, 10),
    ],
)
def test_the_checker_rejects_words_the_machine_refuses(
    trace: list[Any], options: dict[str, Any], number: int, index: int
) -> None:
    error = violation(trace, **options)
    assert (error.rule, error.index) == (number, index)


class _Anything:
    """A transition table that accepts every event anywhere; fit_end leads to done."""

    def get(self, key: tuple[str, Event]) -> str:
        return "done" if key[1] is FE else "anywhere"

    def __contains__(self, key: object) -> bool:
        return True


@pytest.mark.parametrize(
    ("trace", "number", "index"),
    [
        ([FS, ES, BS, BE, EE, FE], 2, 2),  # a batch outside a phase
        ([FS, ES, TS, EE, FE], 2, 3),  # closes the epoch with training open
        ([FS, ES, FE], 2, 2),
        ([FS, ES, TS, TE, TS, TE, EE, FE], 2, 4),  # two training phases
        ([FS, ES, VS, VE, TS, TE, EE, FE], 2, 4),  # training after validation
        ([FS, FE, FE], 2, 2),
        ([FS, ES, TS, BS, US, US, BE, TE, EE, FE], 3, 5),
        ([FS, ES, TS, BS, IPE, BE, TE, EE, FE], 3, 4),
        ([FS, ES, TS, US, TE, EE, FE], 3, 3),
    ],
)
def test_scope_and_step_rules_hold_even_where_a_machine_would_allow_more(
    monkeypatch: pytest.MonkeyPatch, trace: list[Event], number: int, index: int
) -> None:
    monkeypatch.setattr(trace_checker, "_table", _Anything)
    error = violation(trace)
    assert (error.rule, error.index) == (number, index)


def test_the_checker_rejects_broken_indices_and_starts_after_a_stop() -> None:
    good = recorded()
    at = [entry.event for entry in good].index
    second_epoch = at(ES, at(ES) + 1)
    first_batch_end = at(BE)
    stop = ScriptStep(0, "observer", US, 1, Stop("s"))
    stopped = recorded([stop])
    assert_valid_trace(stopped)
    assert [entry.stop_reason for entry in stopped[-4:]] == ["s"] * 4
    cases: list[tuple[list[TraceEntry], dict[str, Any], int, int]] = [
        (edit(good, 0, epoch_index=1), {}, 4, 0),
        (edit(good, second_epoch, epoch_index=0), {}, 4, second_epoch),
        (edit(good, second_epoch, epoch_index=2), {"epoch_count": 2}, 4, second_epoch),
        (edit(good, second_epoch, len(good), epoch_index=3), {"epoch_count": 3}, 4, second_epoch),
        (edit(good, 2, batch_index=1), {}, 4, 2),  # training_start
        (edit(good, 6, batch_index=0), {}, 4, 6),  # the second batch_start
        (edit(good, 5, batch_index=1), {}, 4, 5),  # the first batch_end
        (edit(good, 4, is_training=False), {}, 4, 4),
        (edit(good, first_batch_end, len(good), stop_reason="s"), {}, 6, first_batch_end + 1),
        (edit(good, 9, failed=True), {}, 6, 10),  # an end may fail, but it cannot be undone
        (edit(good, 10, failed=True), {}, 6, 10),  # validation_start after a failure
        (edit(stopped, len(stopped) - 1, stop_reason="t"), {}, 6, len(stopped) - 1),
    ]
    for entries, options, number, index in cases:
        error = violation(entries, **options)
        assert (error.rule, error.index) == (number, index), error
    # Vetoed epochs still count: epoch_start may jump, within epoch_count.
    assert_valid_trace(edit(good, second_epoch, len(good), epoch_index=3))

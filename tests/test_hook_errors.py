"""Observers that raise, and decisions the loop refuses.

An observer's event has happened, so every observer must see it even when one
raises (a recorder placed last still records a valid trace); the first exception
is re-raised unchanged, later ones attached as notes. A refused decision (veto of a
scope end, illegal or conflicting redirect) is recorded before the error.
"""

from __future__ import annotations

import pytest

from statemachine_loop import (
    ConflictingDecisionsError,
    Event,
    IllegalRedirectError,
    LifecycleError,
    Redirect,
    Stop,
    TrainingLoop,
    Veto,
)
from statemachine_loop.testing import TraceRecorder
from statemachine_loop.trace import assert_valid_trace
from tests.helpers import ENGINES, Inject, make_loop, make_model, record_tuple


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("event", [Event.FIT_START, Event.BATCH_START, Event.EPOCH_END])
def test_an_observer_that_raises_does_not_hide_the_event_from_later_observers(
    engine: str, event: Event
) -> None:
    failure = RuntimeError("observer failed")
    later, model = TraceRecorder(), make_model()
    loop = make_loop(
        engine, model, train=2, val=1, callbacks=[Inject(event, failure, hook="on"), later]
    )
    with pytest.raises(RuntimeError) as raised:
        loop.fit(model, 1)
    assert raised.value is failure
    assert event in later.events
    assert later.events[-1] is Event.FIT_END
    assert_valid_trace(later.entries)


@pytest.mark.parametrize("engine", ENGINES)
def test_later_observer_failures_become_notes_on_the_first(engine: str) -> None:
    first, second = ValueError("first"), KeyError("second")
    model = make_model()
    loop = make_loop(
        engine,
        model,
        train=1,
        callbacks=[
            Inject(Event.TRAINING_START, first, hook="on", name="A"),
            Inject(Event.TRAINING_START, second, hook="on", name="B"),
        ],
    )
    with pytest.raises(ValueError) as raised:
        loop.fit(model, 1)
    assert raised.value is first
    assert any("Observer B also raised at training_start" in note for note in first.__notes__)
    assert loop.failure is first


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("event", "decision", "error"),
    [
        (Event.TRAINING_END, Veto("keep going"), LifecycleError),
        (Event.BATCH_END, Redirect(Event.TRAINING_END, "cut"), LifecycleError),
        (Event.TRAINING_START, Redirect(Event.FIT_END, "nowhere"), IllegalRedirectError),
    ],
)
def test_a_refused_decision_is_recorded_before_the_error(
    engine: str, event: Event, decision: Veto | Redirect, error: type[Exception]
) -> None:
    model = make_model()
    loop = make_loop(engine, model, train=2, callbacks=[Inject(event, decision, name="Bad")])
    with pytest.raises(error):
        loop.fit(model, 1)
    target = decision.event if isinstance(decision, Redirect) else None
    kind = "veto" if isinstance(decision, Veto) else "redirect"
    assert [record_tuple(r) for r in loop.decisions] == [
        (event, "Bad", kind, decision.reason, target, False, "refused")
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_conflicting_redirects_are_both_recorded_as_refused(engine: str) -> None:
    model = make_model()
    loop = make_loop(
        engine,
        model,
        train=2,
        val=1,
        callbacks=[
            Inject(Event.TRAINING_START, Redirect(Event.VALIDATION_START, "a"), name="A"),
            Inject(Event.TRAINING_START, Redirect(Event.EPOCH_END, "b"), name="B"),
        ],
    )
    with pytest.raises(ConflictingDecisionsError):
        loop.fit(model, 1)
    assert [(r.callback, r.target, r.applied, r.ignored_because) for r in loop.decisions] == [
        ("A", Event.VALIDATION_START, False, "refused"),
        ("B", Event.EPOCH_END, False, "refused"),
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_observer_after_others_returns_stop_then_later_observers_see_the_reason(
    engine: str,
) -> None:
    reasons: list[str | None] = []

    def later(loop: TrainingLoop, event: Event) -> None:
        if event is Event.BATCH_END and loop.batch_index == 1 and loop.is_training:
            reasons.append(loop.stop_reason)

    model = make_model()
    loop = make_loop(
        engine,
        model,
        train=4,
        callbacks=[
            TraceRecorder(),
            Inject(Event.BATCH_END, Stop("enough"), hook="on", at=1, name="Stopper"),
            later,
        ],
    )
    loop.fit(model, 1)
    assert reasons == ["enough"]
    assert loop.stop_reason == "enough"
    assert [record_tuple(r) for r in loop.decisions] == [
        (Event.BATCH_END, "Stopper", "stop", "enough", None, True, None)
    ]
    assert loop.history.training[-1]["epoch"] == 0
    assert loop.batch_index == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_an_observer_after_others_returns_a_veto_and_every_observer_still_sees_the_event(
    engine: str,
) -> None:
    first, last = TraceRecorder(), TraceRecorder()
    model = make_model()
    loop = make_loop(
        engine,
        model,
        train=3,
        callbacks=[first, Inject(Event.BATCH_END, Veto("no"), hook="on", at=2), last],
    )
    with pytest.raises(LifecycleError, match="returned Veto"):
        loop.fit(model, 1)
    assert first.events.count(Event.BATCH_END) == last.events.count(Event.BATCH_END) == 3
    assert_valid_trace(last.entries)

"""Exceptions anywhere in a fit: the wind-down, ``loop.failure``, and the original re-raised.

The fit is 2 epochs of 3 training and 3 validation batches. An exception is raised at
one event (from a guard: the event is not taken; from an observer: it is) or from the
model, the loss or the optimizer; the expected trace is the ordinary one cut there,
then the end of every open scope, innermost first (:func:`helpers.interrupted`).
"""

from __future__ import annotations

from typing import Any

import helpers as h
import pytest
from helpers import BE, BS, EE, ES, FE, FS, IPE, TE, TS, US, VE, VS, Inject

from statemachine_loop import Callback, Event, Stop
from statemachine_loop.testing import TraceRecorder

pytestmark = pytest.mark.parametrize("engine", h.ENGINES)

T = V = 3
FULL = h.fit_trace(2, T, V)

#: Every event, at one hook call each (batch_start and batch_end in both phases).
SITES = [
    (FS, 0),
    (ES, 1),
    (TS, 0),
    (BS, 1),
    (US, 1),
    (BE, 1),
    (TE, 0),
    (VS, 0),
    (BS, 4),
    (IPE, 1),
    (BE, 4),
    (VE, 0),
    (EE, 0),
    (FE, 0),
]
SITE_IDS = [f"{event.value}@{at}" for event, at in SITES]


class Boom(Exception):  # noqa: N818 - a test's own exception
    pass


def _fit_raises(loop: Any, model: Any, error: BaseException) -> None:
    with pytest.raises(type(error)) as info:
        loop.fit(model, 2)
    assert info.value is error
    assert loop.failure is error


def _check_wind_down(recorder: TraceRecorder, expected: list[Event], cut: int) -> None:
    assert recorder.events == expected
    if expected:
        assert recorder.events.count(FE) == 1 and recorder.events[-1] is FE
    assert all(entry.failed for entry in recorder.entries[cut:])
    assert not any(entry.failed for entry in recorder.entries[:cut])


@pytest.mark.parametrize(("event", "at"), SITES, ids=SITE_IDS)
@pytest.mark.parametrize("hook", ["guard", "on"])
def test_exception_from_a_hook_at_every_event(
    engine: str, event: Event, at: int, hook: str
) -> None:
    error = Boom(f"{hook} {event.value}")
    recorder, model = TraceRecorder(), h.make_model()
    loop = h.make_loop(
        engine, model, train=T, val=V, callbacks=[recorder, Inject(event, error, hook=hook, at=at)]
    )
    _fit_raises(loop, model, error)
    taken = hook == "on"
    cut = h.occurrence(FULL, event, at) + taken
    _check_wind_down(recorder, h.interrupted(FULL, event, at, taken=taken), cut)
    assert loop.state == ("done" if recorder.events else "idle")


def _failing_step_hook(raise_at: int, error: BaseException) -> Any:
    calls = []

    def hook(*args: Any) -> None:
        calls.append(1)
        if len(calls) - 1 == raise_at:
            raise error

    return hook


# (what raises, its failing call, the event whose n-th occurrence it follows)
WORK = [
    ("forward", 1, BS, 1),  # training batch 1
    ("forward", T + 1, BS, T + 1),  # validation batch 1
    ("loss", 1, BS, 1),  # training batch 1: after forward, before update_start
    ("loss", T + 1, IPE, 1),  # validation batch 1: after inference_prediction_end
    ("step", 1, US, 1),  # training batch 1: after update_start
]


@pytest.mark.parametrize(("work", "call", "event", "n"), WORK)
def test_exception_from_model_loss_or_optimizer(
    engine: str, work: str, call: int, event: Event, n: int
) -> None:
    error = Boom(work)
    recorder = TraceRecorder()
    model = h.CountingLinear(raise_at=call if work == "forward" else None, exc=error)
    loss_fn = h.CountingLoss(raise_at=call if work == "loss" else None, exc=error)
    loop = h.make_loop(engine, model, train=T, val=V, loss_fn=loss_fn, callbacks=[recorder])
    if work == "step":
        loop.optimizer.register_step_pre_hook(_failing_step_hook(call, error))
    _fit_raises(loop, model, error)
    cut = h.occurrence(FULL, event, n) + 1
    _check_wind_down(recorder, h.interrupted(FULL, event, n, taken=True), cut)


class Noisy(Callback):
    """Raises from hooks of the wind-down (once the loop failed or stopped)."""

    def __init__(self) -> None:
        self.errors = {
            "on_training_end": Boom("noise at training_end"),
            "guard_epoch_end": Boom("noise at epoch_end"),
            "on_fit_end": Boom("noise at fit_end"),
        }

    def _maybe(self, loop: Any, hook: str) -> None:
        if loop.failure is not None or loop.stop_reason is not None:
            raise self.errors[hook]

    def on_training_end(self, loop: Any) -> None:
        self._maybe(loop, "on_training_end")

    def guard_epoch_end(self, loop: Any) -> None:
        self._maybe(loop, "guard_epoch_end")

    def on_fit_end(self, loop: Any) -> None:
        self._maybe(loop, "on_fit_end")


def test_hook_exceptions_during_wind_down_become_notes(engine: str) -> None:
    error = Boom("original")
    noisy, recorder = Noisy(), TraceRecorder()
    model = h.CountingLinear(raise_at=1, exc=error)  # training batch 1
    # The recorder comes after the noisy callback: its observers must still run.
    loop = h.make_loop(engine, model, train=T, val=V, callbacks=[noisy, recorder])
    _fit_raises(loop, model, error)

    assert recorder.events == h.interrupted(FULL, BS, 1, taken=True)
    assert recorder.events[-4:] == [BE, TE, EE, FE]
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 3
    for note, (hook, noise) in zip(notes, noisy.errors.items(), strict=True):
        event = hook.split("_", 1)[1]
        assert "Noisy" in note and event in note and str(noise) in note


def test_hook_exception_after_a_stop_is_raised_after_fit_end(engine: str) -> None:
    noisy, recorder = Noisy(), TraceRecorder()
    model = h.make_model()
    stopper = Inject(BS, Stop("halt"), at=1)
    loop = h.make_loop(engine, model, train=T, val=V, callbacks=[stopper, noisy, recorder])
    first = noisy.errors["on_training_end"]
    with pytest.raises(Boom) as info:
        loop.fit(model, 2)

    assert info.value is first
    assert recorder.events == h.interrupted(FULL, BS, 1, taken=False)
    assert recorder.events[-3:] == [TE, EE, FE]
    notes = getattr(first, "__notes__", [])
    assert len(notes) == 2
    assert "epoch_end" in notes[0] and "fit_end" in notes[1]
    assert loop.stop_reason == "halt"


@pytest.mark.parametrize("where", ["forward", "observer"])
def test_keyboard_interrupt_winds_down_and_is_re_raised(engine: str, where: str) -> None:
    interrupt = KeyboardInterrupt()
    recorder = TraceRecorder()
    model = h.CountingLinear(raise_at=1 if where == "forward" else None, exc=interrupt)
    callbacks: list[Any] = [recorder]
    if where == "observer":
        callbacks.append(Inject(US, interrupt, hook="on", at=1))
    loop = h.make_loop(engine, model, train=T, val=V, callbacks=callbacks)
    _fit_raises(loop, model, interrupt)
    event = BS if where == "forward" else US
    cut = h.occurrence(FULL, event, 1) + 1
    _check_wind_down(recorder, h.interrupted(FULL, event, 1, taken=True), cut)


def test_fit_after_a_failure_runs_normally(engine: str) -> None:
    error = Boom("once")
    recorder, model = TraceRecorder(), h.make_model()
    loop = h.make_loop(engine, model, train=T, val=V, callbacks=[recorder])
    with pytest.raises(Boom):
        loop.fit(model, 2, callbacks=[Inject(VS, error)])
    recorder.clear()
    loop.fit(model, 2)
    assert recorder.events == FULL
    assert loop.failure is None
    assert [FULL[1], FULL[2], FULL[-3]] == [ES, TS, VE]


class _AlwaysRaises(Callback):
    """Its training_end guard raises a new exception on every call."""

    def __init__(self) -> None:
        self.raised: list[Boom] = []

    def guard_training_end(self, loop: Any) -> None:
        self.raised.append(Boom(f"raise {len(self.raised)}"))
        raise self.raised[-1]


def test_a_hook_that_raises_again_in_the_wind_down_does_not_stop_it(engine: str) -> None:
    always, recorder, model = _AlwaysRaises(), TraceRecorder(), h.make_model()
    loop = h.make_loop(engine, model, train=T, val=V, callbacks=[always, recorder])
    with pytest.raises(Boom) as info:
        loop.fit(model, 2)
    first, second = always.raised
    assert info.value is first and loop.failure is first
    # Not taken when proposed, then proposed again by the wind-down, where it is taken.
    cut = h.occurrence(FULL, TE, 0)
    _check_wind_down(recorder, h.interrupted(FULL, TE, 0, taken=False), cut)
    assert len(first.__notes__) == 1 and str(second) in first.__notes__[0]

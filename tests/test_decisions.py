"""The decision matrix of lifecycle.md "What a decision does", injected at every event.

The fit is 2 epochs of 3 training and 3 validation batches. Each *site* is one event
at one 0-based hook call (the call index equals its occurrence in the ordinary trace,
since nothing before the site changes the run). Expected traces are composed: the
veto and redirect rows by hand from per-scope lists, the stop and error rows with
:func:`helpers.interrupted` (the ordinary trace cut at the site, then every open scope
closed innermost first, which is the contract's wind-down rule).
"""

from __future__ import annotations

from typing import Any

import helpers as h
import pytest
import torch
from helpers import BE, BS, EE, ES, FE, FS, IPE, TE, TS, US, VE, VS, Inject
from torch.nn.functional import mse_loss

from statemachine_loop import Event, Redirect, Stop, Veto
from statemachine_loop.errors import ConflictingDecisionsError, IllegalRedirectError, LifecycleError
from statemachine_loop.testing import TraceRecorder

T = V = 3
FULL = h.fit_trace(2, T, V)
EP = h.epoch_trace(T, V)
tb, vb = h.train_batch(), h.val_batch()
ALL = ([0, 1], [0, 1])

#: site id -> (event, hook call index, History epochs after a Stop there, guard or observer)
SITES: dict[str, tuple[Event, int, tuple[list[int], list[int]]]] = {
    "fit_start": (FS, 0, ([], [])),
    "epoch_start": (ES, 1, ([0], [0])),
    "training_start": (TS, 0, ([], [])),
    "batch_start-training": (BS, 1, ([0], [])),
    "update_start": (US, 1, ([0], [])),
    "batch_end-training": (BE, 1, ([0], [])),
    "training_end": (TE, 0, ([0], [])),
    "validation_start": (VS, 0, ([0], [])),
    "batch_start-validation": (BS, 4, ([0], [0])),
    "prediction_end": (IPE, 1, ([0], [0])),
    "batch_end-validation": (BE, 4, ([0], [0])),
    "validation_end": (VE, 0, ([0], [0])),
    "epoch_end": (EE, 0, ([0], [0])),
    "fit_end": (FE, 0, ALL),
}
END_SITES = [site for site, (event, _, _) in SITES.items() if event.is_scope_end]

TP, VP = h.training_phase(T), h.validation_phase(V)
pytestmark = pytest.mark.parametrize("engine", h.ENGINES)

#: Veto (target None) and Redirect rows: (site, target) -> (trace, History epochs).
NOT_TAKEN: dict[tuple[str, Event | None], tuple[list[Event], tuple[list[int], list[int]]]] = {
    ("fit_start", None): ([], ([], [])),
    ("epoch_start", None): (h.fit_of(EP), ([0], [0])),
    ("epoch_start", FE): (h.fit_of(EP), ([0], [0])),
    ("training_start", None): (h.fit_of([ES, *VP, EE], EP), ([1], [0, 1])),
    ("training_start", VS): (h.fit_of([ES, *VP, EE], EP), ([1], [0, 1])),
    ("training_start", EE): (h.fit_of([ES, EE], EP), ([1], [1])),
    ("batch_start-training", None): (h.fit_of([ES, TS, *tb, *tb, TE, *VP, EE], EP), ALL),
    ("batch_start-training", TE): (h.fit_of([ES, TS, *tb, TE, *VP, EE], EP), ALL),
    ("update_start", None): (h.fit_of([ES, TS, *tb, BS, BE, *tb, TE, *VP, EE], EP), ALL),
    ("update_start", BE): (h.fit_of([ES, TS, *tb, BS, BE, *tb, TE, *VP, EE], EP), ALL),
    ("validation_start", None): (h.fit_of([ES, *TP, EE], EP), ([0, 1], [1])),
    ("validation_start", EE): (h.fit_of([ES, *TP, EE], EP), ([0, 1], [1])),
    ("batch_start-validation", None): (h.fit_of([ES, *TP, VS, *vb, *vb, VE, EE], EP), ALL),
    ("batch_start-validation", VE): (h.fit_of([ES, *TP, VS, *vb, VE, EE], EP), ALL),
    ("prediction_end", None): (
        h.fit_of([ES, *TP, VS, *vb, BS, BE, *vb, VE, EE], EP),
        ALL,
    ),
    ("prediction_end", BE): (h.fit_of([ES, *TP, VS, *vb, BS, BE, *vb, VE, EE], EP), ALL),
}


def _state_before(event: Event, at: int) -> str:
    return h.states_along(FULL)[h.occurrence(FULL, event, at)][0]


def _run(engine: str, *callbacks: Any) -> tuple[Any, TraceRecorder, Any]:
    return h.recorded(engine, *callbacks, train=T, val=V)


def _fit_ok(engine: str, inject: Inject) -> tuple[Any, TraceRecorder]:
    loop, recorder, model = _run(engine, inject)
    loop.fit(model, 2)
    assert loop.failure is None
    return loop, recorder


def _fit_fails(engine: str, inject: Inject, error: type[BaseException]) -> tuple[Any, Any, Any]:
    loop, recorder, model = _run(engine, inject)
    with pytest.raises(error) as info:
        loop.fit(model, 2)
    assert loop.failure is info.value
    if recorder.events:
        assert recorder.events.count(FE) == 1 and recorder.events[-1] is FE
    return loop, recorder, info.value


@pytest.mark.parametrize(("site", "target"), list(NOT_TAKEN))
def test_veto_or_redirect(engine: str, site: str, target: Event | None) -> None:
    event, at, _ = SITES[site]
    decision = Veto("no") if target is None else Redirect(target, "no")
    if target is not None:
        assert target in h.CONTRACT_REDIRECTS[(_state_before(event, at), event)]
    loop, recorder = _fit_ok(engine, Inject(event, decision, at=at, name="Decider"))
    trace, history = NOT_TAKEN[(site, target)]
    assert recorder.events == trace
    assert h.history_epochs(loop) == history
    kind = "veto" if target is None else "redirect"
    assert [h.record_tuple(r) for r in loop.decisions] == [
        (event, "Decider", kind, "no", target, True, None)
    ]
    assert loop.stop_reason is None


def _illegal_target(event: Event, state: str) -> Event:
    allowed = h.CONTRACT_REDIRECTS.get((state, event), ())
    return next(e for e in (FE, EE, TE, VE, BS) if e not in allowed and e is not event)


@pytest.mark.parametrize("site", [s for s in SITES if s not in END_SITES])
def test_redirect_to_illegal_target(engine: str, site: str) -> None:
    event, at, _ = SITES[site]
    state = _state_before(event, at)
    target = _illegal_target(event, state)
    _, recorder, error = _fit_fails(
        engine, Inject(event, Redirect(target), at=at, name="Wanderer"), IllegalRedirectError
    )
    assert recorder.events == h.interrupted(FULL, event, at, taken=False)
    message = str(error)
    for word in (f"'{state}'", f"'{event.value}'", f"'{target.value}'", "Wanderer"):
        assert word in message
    for allowed in h.CONTRACT_REDIRECTS.get((state, event), ()):
        assert f"'{allowed.value}'" in message


@pytest.mark.parametrize("decision", [Veto("no"), Redirect(FE), Redirect(EE)], ids=repr)
@pytest.mark.parametrize("site", END_SITES)
def test_veto_or_redirect_of_scope_end_is_lifecycle_error(
    engine: str, site: str, decision: Any
) -> None:
    event, at, _ = SITES[site]
    _, recorder, error = _fit_fails(
        engine, Inject(event, decision, at=at, name="Blocker"), LifecycleError
    )
    assert not isinstance(error, IllegalRedirectError)
    assert recorder.events == h.interrupted(FULL, event, at, taken=False)
    assert event.value in str(error) and "Blocker" in str(error)


@pytest.mark.parametrize("site", list(SITES))
def test_stop_from_guard(engine: str, site: str) -> None:
    event, at, _ = SITES[site]
    loop, recorder = _fit_ok(engine, Inject(event, Stop("halt"), at=at, name="Stopper"))
    # A start is not taken; a scope end is taken, then the loop winds down.
    assert recorder.events == h.interrupted(FULL, event, at, taken=event.is_scope_end)
    assert h.history_epochs(loop) == SITES[site][2]
    assert [h.record_tuple(r) for r in loop.decisions] == [
        (event, "Stopper", "stop", "halt", None, True, None)
    ]
    assert loop.stop_reason == "halt"
    # The wind-down's hooks see stop_reason set.
    if recorder.events:
        cut = h.occurrence(FULL, event, at)
        assert {entry.stop_reason for entry in recorder.entries[cut:]} == {"halt"}
        assert {entry.stop_reason for entry in recorder.entries[:cut]} <= {None}


@pytest.mark.parametrize("site", list(SITES))
def test_stop_from_observer(engine: str, site: str) -> None:
    event, at, _ = SITES[site]
    loop, recorder = _fit_ok(engine, Inject(event, Stop("halt"), hook="on", at=at, name="Stopper"))
    assert recorder.events == h.interrupted(FULL, event, at, taken=True)
    assert h.history_epochs(loop) == SITES[site][2]
    assert [h.record_tuple(r) for r in loop.decisions] == [
        (event, "Stopper", "stop", "halt", None, True, None)
    ]
    assert loop.decisions[0].from_observer
    assert loop.stop_reason == "halt"
    # Everything after the stopped event runs with stop_reason set (the wind-down).
    cut = h.occurrence(FULL, event, at) + 1
    assert {entry.stop_reason for entry in recorder.entries[cut:]} <= {"halt"}
    assert {entry.stop_reason for entry in recorder.entries[: cut - 1]} <= {None}


@pytest.mark.parametrize("value", [Veto("no"), Redirect(FE), True, "stop"], ids=repr)
@pytest.mark.parametrize("site", list(SITES))
def test_observer_returning_non_stop_is_lifecycle_error(engine: str, site: str, value: Any) -> None:
    event, at, _ = SITES[site]
    _, recorder, error = _fit_fails(
        engine, Inject(event, value, hook="on", at=at, name="Chatty"), LifecycleError
    )
    assert recorder.events == h.interrupted(FULL, event, at, taken=True)
    assert event.value in str(error) and "Chatty" in str(error)


@pytest.mark.parametrize("value", [True, "veto"], ids=repr)
@pytest.mark.parametrize("site", list(SITES))
def test_guard_returning_non_decision_is_lifecycle_error(
    engine: str, site: str, value: Any
) -> None:
    event, at, _ = SITES[site]
    _, recorder, error = _fit_fails(
        engine, Inject(event, value, at=at, name="Confused"), LifecycleError
    )
    assert recorder.events == h.interrupted(FULL, event, at, taken=False)
    assert event.value in str(error) and "Confused" in str(error)


# -- precedence ----------------------------------------------------------------------------


def _guards(event: Event, *decisions: tuple[str, Any]) -> list[Inject]:
    return [Inject(event, decision, name=name) for name, decision in decisions]


OUT = "outranked"
PRECEDENCE = [
    # (guards on training_start@0, trace, records as (name, kind, applied, ignored_because))
    (
        [("a", Veto("v")), ("b", Stop("s")), ("c", Redirect(EE, "r"))],
        h.interrupted(FULL, TS, 0, taken=False),
        [("a", "veto", False, OUT), ("b", "stop", True, None), ("c", "redirect", False, OUT)],
    ),
    (
        [("a", Stop("s")), ("b", Veto("v"))],
        h.interrupted(FULL, TS, 0, taken=False),
        [("a", "stop", True, None), ("b", "veto", False, OUT)],
    ),
    (
        [("a", Veto("v")), ("b", Redirect(EE, "r"))],
        h.fit_of([ES, EE], EP),
        [("a", "veto", False, OUT), ("b", "redirect", True, None)],
    ),
    (
        [("a", Redirect(EE, "r")), ("b", Veto("v")), ("c", Redirect(EE, "r"))],
        h.fit_of([ES, EE], EP),
        [("a", "redirect", True, None), ("b", "veto", False, OUT), ("c", "redirect", True, None)],
    ),
    (
        [("a", Veto("v")), ("b", Veto("v"))],
        h.fit_of([ES, *h.validation_phase(V), EE], EP),
        [("a", "veto", True, None), ("b", "veto", True, None)],
    ),
]


@pytest.mark.parametrize(("decided", "trace", "records"), PRECEDENCE)
def test_precedence_stop_over_redirect_over_veto(
    engine: str, decided: list[tuple[str, Any]], trace: list[Event], records: list[Any]
) -> None:
    loop, recorder, model = _run(engine, *_guards(TS, *decided))
    loop.fit(model, 2)
    assert recorder.events == trace
    got = [(r.callback, r.kind.value, r.applied, r.ignored_because) for r in loop.decisions]
    assert got == records
    assert all(r.event is TS for r in loop.decisions)
    assert loop.stop_reason == ("s" if any(k == "stop" for _, k, _, _ in records) else None)


def test_conflicting_redirects_raise_and_wind_down(engine: str) -> None:
    loop, recorder, model = _run(engine, *_guards(TS, ("a", Redirect(VS)), ("b", Redirect(EE))))
    with pytest.raises(ConflictingDecisionsError) as info:
        loop.fit(model, 2)
    assert recorder.events == h.interrupted(FULL, TS, 0, taken=False) == [FS, ES, EE, FE]
    assert loop.failure is info.value
    assert "'a'" in str(info.value) and "'b'" in str(info.value)


def test_redirect_target_is_proposed_like_any_event(engine: str) -> None:
    # training_start -> validation_start, whose own guard vetoes it: the epoch closes.
    loop, recorder, model = _run(
        engine, Inject(TS, Redirect(VS, "r"), name="a"), Inject(VS, Veto("v"), name="b")
    )
    loop.fit(model, 1)
    assert recorder.events == [FS, ES, EE, FE]
    assert [(r.event, r.callback, r.kind.value) for r in loop.decisions] == [
        (TS, "a", "redirect"),
        (VS, "b", "veto"),
    ]
    # epoch_start -> fit_end, whose guard stops: the end is taken, with stop_reason set.
    loop, recorder, model = _run(
        engine, Inject(ES, Redirect(FE), name="a"), Inject(FE, Stop("s"), name="b")
    )
    loop.fit(model, 2)
    assert recorder.events == [FS, FE] and loop.stop_reason == "s"


def test_redirect_to_validation_needs_validation_data(engine: str) -> None:
    model = h.make_model()
    loop = h.make_loop(engine, model, train=1, callbacks=[Inject(TS, Redirect(VS))])
    with pytest.raises(IllegalRedirectError) as info:
        loop.fit(model, 1)
    assert "'validation_start'" in str(info.value) and "['epoch_end']" in str(info.value)


# -- what the work does after a decision ---------------------------------------------------


@pytest.mark.parametrize("decision", [Veto("acc"), Redirect(BE, "acc")], ids=repr)
def test_vetoed_updates_keep_params_and_accumulate_gradients(engine: str, decision: Any) -> None:
    model, data = h.make_model(), h.loader(3, seed=1)
    before = h.params_of(model)
    loop = h.make_loop(engine, model, training=data, callbacks=[Inject(US, decision, at=None)])
    history = loop.fit(model, 2)

    # Params never move, so each epoch sees the same batch gradients; gradients are
    # zeroed at each training_start, so what is left is one epoch's sum.
    hand = h.make_model()
    losses = [mse_loss(hand(x), y) for x, y in data]
    for loss in losses:
        loss.backward()
    assert h.same_tensors(h.params_of(model), before)
    assert h.same_tensors([p.grad for p in model.parameters()], [p.grad for p in hand.parameters()])
    mean = sum(v.item() for v in losses) / 3
    assert [e["loss"] for e in history.training] == pytest.approx([mean, mean])


def test_accumulated_gradients_are_applied_by_the_next_taken_step(engine: str) -> None:
    model, data = h.make_model(), h.loader(3, seed=1)
    veto = Inject(US, Veto("acc"), at=None, when=lambda loop: loop.batch_index < 2)
    h.make_loop(engine, model, training=data, callbacks=[veto]).fit(model, 1)

    hand = h.make_model()
    optimizer = torch.optim.SGD(hand.parameters(), lr=0.1)
    for x, y in data:
        mse_loss(hand(x), y).backward()
    optimizer.step()
    assert h.same_tensors(h.params_of(model), h.params_of(hand))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("decision", [Veto("skip"), Redirect(BE)], ids=repr)
def test_vetoed_prediction_is_not_scored(engine: str, decision: Any) -> None:
    model, loss_fn, counter, val = (
        h.make_model(),
        h.CountingLoss(),
        h.CountingMetric(),
        h.loader(3, seed=2),
    )
    inject = Inject(IPE, decision, at=1)
    loop = h.make_loop(
        engine,
        model,
        train=1,
        validation=val,
        loss_fn=loss_fn,
        metrics=[counter],
        callbacks=[inject],
    )
    history = loop.fit(model, 1)
    assert loss_fn.calls == 1 + 2
    assert history.validation[0]["updates"] == 2 and counter.total == 1 + 2
    with torch.no_grad():
        scored = [float(mse_loss(model(x), y)) for i, (x, y) in enumerate(val) if i != 1]
    assert history.validation[0]["loss"] == pytest.approx(sum(scored) / 2)


@pytest.mark.parametrize(
    ("event", "at", "counted", "expected"),
    [(BS, 1, "forward", 1), (BS, 4, "forward", 3 + 1), (US, 1, "step", 1), (IPE, 1, "loss", 3 + 1)],
)
def test_stop_from_observer_skips_the_work_that_follows(
    engine: str, event: Event, at: int, counted: str, expected: int
) -> None:
    model, loss_fn, steps = h.CountingLinear(), h.CountingLoss(), []
    loop = h.make_loop(engine, model, train=T, val=V, loss_fn=loss_fn)
    loop.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    loop.fit(model, 2, callbacks=[Inject(event, Stop("now"), hook="on", at=at)])
    got = {"forward": model.calls, "step": len(steps), "loss": loss_fn.calls}
    assert got[counted] == expected
    assert loop.stop_reason == "now"


def _winding(loop: Any) -> bool:
    return loop.stop_reason is not None or loop.failure is not None


def _meddlers() -> list[Inject]:
    """Decide on every end once the loop is winding down: all must be ignored."""
    return [
        Inject(event, value, hook=hook, at=None, when=_winding, name="Meddler")
        for event, hook, value in [
            (TE, "guard", Veto("keep")),
            (TE, "on", Stop("again")),
            (EE, "guard", Redirect(FE, "skip")),
            (FE, "guard", Veto("never")),
        ]
    ]


@pytest.mark.parametrize("cause", ["stop", "failure"])
def test_decisions_during_wind_down_are_recorded_and_ignored(engine: str, cause: str) -> None:
    error = RuntimeError("boom")
    value = Stop("halt") if cause == "stop" else error
    loop, recorder, model = _run(engine, Inject(BS, value, at=1, name="Cause"), *_meddlers())
    if cause == "stop":
        loop.fit(model, 2)
    else:
        with pytest.raises(RuntimeError) as info:
            loop.fit(model, 2)
        assert info.value is error
    assert recorder.events == h.interrupted(FULL, BS, 1, taken=False)
    wound = [
        (TE, "Meddler", "veto", "keep", None, False, "wind-down"),
        (TE, "Meddler", "stop", "again", None, False, "wind-down"),
        (EE, "Meddler", "redirect", "skip", FE, False, "wind-down"),
        (FE, "Meddler", "veto", "never", None, False, "wind-down"),
    ]
    first = [(BS, "Cause", "stop", "halt", None, True, None)] if cause == "stop" else []
    assert [h.record_tuple(r) for r in loop.decisions] == first + wound
    assert loop.stop_reason == ("halt" if cause == "stop" else None)


def test_outcome_readable_after_fit_and_reset_at_next_fit(engine: str) -> None:
    loop, _, model = _run(engine)
    loop.fit(model, 1, callbacks=[Inject(US, Veto("v")), Inject(BS, Stop("halt"), at=1)])
    assert loop.stop_reason == "halt" and len(loop.decisions) == 2 and loop.failure is None
    loop.fit(model, 1)
    assert loop.stop_reason is None and loop.decisions == [] and loop.failure is None

    error = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        loop.fit(model, 1, callbacks=[Inject(US, Veto("v")), Inject(BS, error, at=1)])
    assert loop.failure is error and [r.kind.value for r in loop.decisions] == ["veto"]
    loop.fit(model, 1)
    assert loop.failure is None and loop.decisions == [] and loop.stop_reason is None

"""Golden traces of ordinary fits, and what hooks see at each event.

Every expected trace is composed from per-scope lists (``tests/helpers.py``) written
from the lifecycle contract; both engines run every test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import (
    BE,
    BS,
    EE,
    ENGINES,
    ES,
    FE,
    FS,
    IPE,
    TE,
    TS,
    US,
    VE,
    VS,
    Inject,
    epoch_trace,
    fit_of,
    fit_trace,
    loader,
    make_loop,
    make_model,
    states_along,
    training_phase,
    validation_phase,
)

from statemachine_loop import Callback, Event, Redirect, TrainingLoop, Veto
from statemachine_loop.testing import TraceRecorder

pytestmark = pytest.mark.parametrize("engine", ENGINES)

SHAPES = [(1, 1, 0), (2, 3, 0), (2, 2, 1), (3, 1, 2)]


@pytest.mark.parametrize(("epochs", "train", "val"), SHAPES)
def test_ordinary_fit_equals_composed_trace(engine: str, epochs: int, train: int, val: int) -> None:
    recorder = TraceRecorder()
    model = make_model()
    loop = make_loop(engine, model, train=train, val=val, callbacks=[recorder])
    history = loop.fit(model, epochs)

    assert recorder.events == fit_trace(epochs, train, val)
    assert loop.state == "done"
    assert [entry["epoch"] for entry in history.training] == list(range(epochs))
    assert [entry["epoch"] for entry in history.validation] == (list(range(epochs)) if val else [])
    assert loop.stop_reason is None and loop.failure is None and loop.decisions == []


@pytest.mark.parametrize(("epochs", "train", "val"), SHAPES)
def test_state_after_each_event_matches_contract_table(
    engine: str, epochs: int, train: int, val: int
) -> None:
    recorder = TraceRecorder()
    seen: list[tuple[str, str]] = []
    model = make_model()

    def transitions_seen(loop: TrainingLoop, event: Event) -> None:
        seen.append((loop.previous_state, loop.state))

    loop = make_loop(engine, model, train=train, val=val, callbacks=[recorder, transitions_seen])
    loop.fit(model, epochs)

    expected = states_along(fit_trace(epochs, train, val))
    assert [entry.state for entry in recorder.entries] == [dest for _, dest in expected]
    assert seen == expected


@pytest.mark.parametrize(
    ("decider", "expected"),
    [
        # A vetoed update: batch_end leaves training_batch, not updating.
        (
            lambda: [Inject(US, Veto("no step"), at=None)],
            fit_of([ES, TS, BS, BE, BS, BE, TE, *validation_phase(1), EE]),
        ),
        # Redirected epoch_start: fit_end is taken from fit.
        (lambda: [Inject(ES, Redirect(FE, "enough"))], [FS, FE]),
        # Skipped training: validation opens from epoch, the epoch closes from validated.
        (lambda: [Inject(TS, Veto("no training"))], fit_of([ES, *validation_phase(1), EE])),
        # Skipped validation: the epoch closes from trained.
        (lambda: [Inject(VS, Veto("no validation"))], fit_of([ES, *training_phase(2), EE])),
        # Skipped training, then validation redirected from epoch to epoch_end (an entry
        # of REDIRECT_TARGETS beyond the contract's table, by its general rule).
        (
            lambda: [Inject(TS, Veto("no training")), Inject(VS, Redirect(EE, "none"))],
            fit_of([ES, EE]),
        ),
    ],
    ids=["veto-update", "redirect-epoch", "veto-training", "veto-validation", "epoch-to-end"],
)
def test_previous_state_is_source_of_taken_transition(
    engine: str, decider: Callable[[], list[Inject]], expected: list[Event]
) -> None:
    seen: list[tuple[Event, str, str]] = []
    model = make_model()

    def transitions_seen(loop: TrainingLoop, event: Event) -> None:
        seen.append((event, loop.previous_state, loop.state))

    loop = make_loop(engine, model, train=2, val=1, callbacks=[*decider(), transitions_seen])
    loop.fit(model, 1)

    assert [event for event, _, _ in seen] == expected
    assert [(src, dst) for _, src, dst in seen] == states_along(expected)


class _PhaseProbe(Callback):
    """Records ``batch_count``, ``batch_index`` and ``is_training`` at phase-start hooks."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None, int, bool]] = []

    def _see(self, hook: str, loop: TrainingLoop) -> None:
        self.seen.append((hook, loop.batch_count, loop.batch_index, loop.is_training))

    def guard_training_start(self, loop: TrainingLoop) -> None:
        self._see("guard_training_start", loop)

    def on_training_start(self, loop: TrainingLoop) -> None:
        self._see("on_training_start", loop)

    def guard_validation_start(self, loop: TrainingLoop) -> None:
        self._see("guard_validation_start", loop)

    def on_validation_start(self, loop: TrainingLoop) -> None:
        self._see("on_validation_start", loop)


class _Unsized:
    """An iterable of batches with no ``len``."""

    def __init__(self, data: Any) -> None:
        self.batches = list(data)

    def __iter__(self) -> Any:
        return iter(self.batches)


def test_batch_count_set_before_phase_start_guards_and_observers(engine: str) -> None:
    probe = _PhaseProbe()
    model = make_model()
    loop = make_loop(engine, model, train=3, val=2, callbacks=[probe])
    loop.fit(model, 2)

    one_epoch = [
        ("guard_training_start", 3, 0, True),
        ("on_training_start", 3, 0, True),
        ("guard_validation_start", 2, 0, False),
        ("on_validation_start", 2, 0, False),
    ]
    assert probe.seen == one_epoch * 2


def test_batch_count_is_none_for_unsized_data_not_stale(engine: str) -> None:
    probe = _PhaseProbe()
    model = make_model()
    loop = make_loop(engine, model, training=_Unsized(loader(3, seed=1)), val=2, callbacks=[probe])
    loop.fit(model, 2)

    one_epoch = [
        ("guard_training_start", None, 0, True),
        ("on_training_start", None, 0, True),
        ("guard_validation_start", 2, 0, False),
        ("on_validation_start", 2, 0, False),
    ]
    assert probe.seen == one_epoch * 2


def _expected_indices(epochs: int, train: int, val: int) -> list[tuple[Any, ...]]:
    """(event, epoch_index, batch_index, is_training) per event; ``None``: not specified."""
    out: list[tuple[Any, ...]] = [(FS, 0, 0, None)]
    for e in range(epochs):
        out.append((ES, e, None, None))
        for phase, count, middle, training in (
            (TS, train, US, True),
            (VS, val, IPE, False),
        ):
            if not count:
                continue
            out.append((phase, e, 0, training))
            for b in range(count):
                out += [(BS, e, b, training), (middle, e, b, training), (BE, e, b, training)]
            out.append((TE if training else VE, e, None, training))
        out.append((EE, e, None, None))
    out.append((FE, None, None, None))
    return out


@pytest.mark.parametrize(("epochs", "train", "val"), SHAPES)
def test_indices_at_each_event(engine: str, epochs: int, train: int, val: int) -> None:
    recorder = TraceRecorder()
    model = make_model()
    loop = make_loop(engine, model, train=train, val=val, callbacks=[recorder])
    loop.fit(model, epochs)

    expected = _expected_indices(epochs, train, val)
    assert [entry.event for entry in recorder.entries] == [row[0] for row in expected]
    for entry, (event, epoch, batch, training) in zip(recorder.entries, expected, strict=True):
        got = (entry.epoch_index, entry.batch_index, entry.is_training)
        want = (epoch, batch, training)
        for g, w in zip(got, want, strict=True):
            assert w is None or g == w, (event, got, want)
    assert loop.epoch_count == epochs


def test_function_observer_receives_event_member(engine: str) -> None:
    seen: list[Any] = []

    def observer(loop: TrainingLoop, event: Event) -> None:
        seen.append(event)

    model = make_model()
    loop = make_loop(engine, model, train=2, val=1, callbacks=[observer])
    loop.fit(model, 2)

    assert seen == fit_trace(2, 2, 1)
    assert all(type(event) is Event for event in seen)
    assert [event.name for event in seen] == [event.name for event in fit_trace(2, 2, 1)]


class _Logged(Callback):
    """Logs every guard and observer call as ``(name, "guard"|"on", event)``."""

    def __init__(self, name: str, log: list[tuple[str, str, Event]]) -> None:
        self._name = name
        for event in Event:
            setattr(self, f"guard_{event.value}", self._make(log, "guard", event))
            setattr(self, f"on_{event.value}", self._make(log, "on", event))

    @property
    def name(self) -> str:
        return self._name

    def _make(self, log: list[tuple[str, str, Event]], kind: str, event: Event) -> Any:
        def hook(loop: TrainingLoop) -> None:
            log.append((self._name, kind, event))

        return hook


def test_callback_order_is_loop_callbacks_then_fit_callbacks(engine: str) -> None:
    log: list[tuple[str, str, Event]] = []

    def d(loop: TrainingLoop, event: Event) -> None:
        log.append(("d", "on", event))

    model = make_model()
    loop = make_loop(
        engine, model, train=1, val=1, callbacks=[_Logged("a", log), _Logged("b", log)]
    )
    loop.fit(model, 1, callbacks=[_Logged("c", log), d])

    expected = []
    for event in fit_trace(1, 1, 1):
        expected += [(n, "guard", event) for n in "abc"]
        expected += [(n, "on", event) for n in "abcd"]
    assert log == expected

    log.clear()
    loop.fit(model, 1)  # fit callbacks were for that fit only
    expected = []
    for event in fit_trace(1, 1, 1):
        expected += [(n, "guard", event) for n in "ab"] + [(n, "on", event) for n in "ab"]
    assert log == expected


def test_vetoed_epoch_counts_against_epochs(engine: str) -> None:
    recorder, model = TraceRecorder(), make_model()
    loop = make_loop(engine, model, train=1, callbacks=[Inject(ES, Veto("rest"), at=1), recorder])
    history = loop.fit(model, 3)
    assert recorder.events == fit_of(epoch_trace(1), epoch_trace(1))
    assert [e.epoch_index for e in recorder.entries if e.event is ES] == [0, 2]
    assert [entry["epoch"] for entry in history.training] == [0, 2]


def test_second_fit_repeats_the_trace(engine: str) -> None:
    recorder = TraceRecorder()
    model = make_model()
    loop = make_loop(engine, model, train=2, val=1, callbacks=[recorder])
    loop.fit(model, 1)
    loop.fit(model, 2)
    assert recorder.events == fit_trace(1, 2, 1) + fit_trace(2, 2, 1)
    assert fit_trace(2, 2, 1) == fit_of(epoch_trace(2, 1), epoch_trace(2, 1))


def test_each_fit_follows_its_own_hooks(engine: str) -> None:
    """Refitting one loop with other callbacks changes what is hooked: the engine's
    per-event plans (the compiled engine keeps them per set of hooked events) follow."""
    model = make_model()
    loop = make_loop(engine, model, train=2)
    veto, recorder = Inject(ES, Veto("rest"), at=None), TraceRecorder()
    fits = [[], [recorder], [veto, recorder], [recorder], [veto, recorder], []]
    traces, trained = [], []
    for callbacks in fits:
        recorder.clear()
        history = loop.fit(model, 1, callbacks=callbacks)
        traces.append(recorder.events if recorder in callbacks else None)
        trained.append(len(history.training))
    vetoed, ordinary = fit_of(), fit_of(epoch_trace(2))
    assert traces == [None, ordinary, vetoed, ordinary, vetoed, None]
    assert trained == [1, 1, 0, 1, 0, 1]

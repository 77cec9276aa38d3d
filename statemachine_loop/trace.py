"""Lifecycle traces: one taken event as recorded, and the checker of the contract's invariants.

A trace is the sequence of events a fit took, each as a :class:`TraceEntry` (what
``TraceRecorder`` in :mod:`statemachine_loop.testing` records, and what the structured
log replays) or as a bare event. :func:`assert_valid_trace` checks, in one pass, the
invariants of the lifecycle contract that a trace alone can show:

1. the trace is a word of the lifecycle machine from ``idle`` to ``done`` (or empty),
   replayed through the transition table read off the machine itself;
2. scopes are balanced and properly nested, ``fit_end`` is last and fires once;
3. ``update_start`` only inside a training batch and ``inference_prediction_end`` only
   inside a validation batch, each at most once per batch;
4. epoch and batch indices count as the contract says (entries only);
6. after a stop, or a failure, no start event fires again (entries only).

The first broken rule raises :class:`TraceViolation`, an ``AssertionError`` that names
the event, its 0-based position, the state there and the events legal there, so a
failing property test reads like a bug report. :func:`replay` gives the state after
each event, for tools that want to show where a trace went (``smloop logs validate``).
The checker is lifecycle logic, so it lives in the core; :mod:`statemachine_loop.testing`
re-exports it for tests.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import attrs

from statemachine_loop.events import (
    END_EVENTS,
    PHASES,
    SCOPE_CLOSED,
    SCOPE_OPENED,
    TRAINING,
    VALIDATION,
    Event,
    Scope,
)
from statemachine_loop.machine import (
    FINAL_STATE,
    INITIAL_STATE,
    MachineModel,
    build_machine,
    transition_table,
)

__all__ = ["TraceEntry", "TraceItem", "TraceViolation", "assert_valid_trace", "replay"]


@attrs.frozen
class TraceEntry:
    """One taken event, with where the loop was when its observers ran."""

    event: Event
    state: str
    epoch_index: int
    batch_index: int
    is_training: bool
    resuming: bool
    stop_reason: str | None
    failed: bool


#: What the checker accepts per position: a recorded entry, an event, or its value.
TraceItem = TraceEntry | Event | str

#: Where each scope may open: the scope that must enclose it (``None``: nothing open).
_PARENT: Mapping[Scope, tuple[Scope | None, ...]] = {
    "fit": (None,),
    "epoch": ("fit",),
    TRAINING: ("epoch",),
    VALIDATION: ("epoch",),
    "batch": PHASES,
}
_STEPS: Mapping[Event, str] = {
    Event.UPDATE_START: TRAINING,
    Event.INFERENCE_PREDICTION_END: VALIDATION,
}
_RULES: Mapping[int, str] = {
    1: "the trace is a word of the lifecycle machine",
    2: "scopes are balanced and nested, fit_end last and once",
    3: "update_start / inference_prediction_end once inside their batch",
    4: "epoch and batch indices count as the contract says",
    6: "after a stop or a failure no start event fires",
}


@functools.cache
def _table() -> Mapping[tuple[str, Event], str]:
    return transition_table(build_machine(MachineModel()))


def _legal(state: str) -> tuple[Event, ...]:
    table = _table()
    return tuple(event for event in Event if (state, event) in table)


class TraceViolation(AssertionError):  # noqa: N818 - an assertion failure, as in pytest
    """A trace broke an invariant of the lifecycle contract.

    ``rule`` is the invariant's number in the contract, ``index`` the 0-based position
    of the first bad event (``len(trace)`` when the trace ends too early), ``event``
    that event (``None`` past the end), ``state`` the machine's state just before it
    and ``legal`` the events the machine accepts there. The message says all of this
    and shows the events that led up to it.
    """

    def __init__(
        self,
        rule: int,
        detail: str,
        *,
        index: int,
        event: Event | None,
        state: str,
        events: Sequence[Event],
        unknown: object = None,
    ) -> None:
        self.rule = rule
        self.detail = detail
        self.index = index
        self.event = event
        self.state = state
        self.legal = _legal(state)
        if event is not None:
            where = f"event #{index} {event.value!r}"
        elif unknown is not None:
            where = f"event #{index} {unknown!r}"
        else:
            where = f"the end of the trace (after {index} events)"
        start = max(0, index - 8)
        shown = [e.value for e in events[start:index]]
        if event is not None:
            shown.append(f"[{event.value}]")
        context = ("... " if start else "") + " ".join(shown)
        super().__init__(
            f"Invariant {rule} ({_RULES[rule]}) is broken at {where}, in state {state!r}: "
            f"{detail}. Legal there: {[e.value for e in self.legal]}.\n"
            f"  trace: {context}"
        )


def _as_event(item: TraceItem, index: int, events: Sequence[Event], state: str) -> Event:
    raw = item.event if isinstance(item, TraceEntry) else item
    try:
        return Event(raw)
    except ValueError:
        raise TraceViolation(
            1,
            f"{raw!r} is not one of the twelve lifecycle events",
            index=index,
            event=None,
            state=state,
            events=events,
            unknown=raw,
        ) from None


def replay(events: Iterable[Event | str], *, start: str = INITIAL_STATE) -> list[str]:
    """The machine's state after each event of ``events``, replayed from ``start``.

    The transitions are read off the lifecycle machine itself, so the replay can
    never disagree with the loop. An event the machine does not accept where it is
    raises :class:`TraceViolation` (invariant 1) naming its position and the events
    legal there.
    """
    table = _table()
    states: list[str] = []
    seen: list[Event] = []
    state = start
    for index, item in enumerate(events):
        event = _as_event(item, index, seen, state)
        dest = table.get((state, event))
        if dest is None:
            raise TraceViolation(
                1,
                f"the machine has no transition for {event.value!r} from {state!r}",
                index=index,
                event=event,
                state=state,
                events=seen,
            )
        seen.append(event)
        states.append(dest)
        state = dest
    return states


class _Checker:
    """One pass over a trace; each ``_check_*`` raises at the first broken rule."""

    def __init__(
        self,
        items: Sequence[TraceItem],
        has_validation: bool | None,
        epoch_count: int | None,
        first_epoch: int,
    ) -> None:
        self.items = items
        self.has_validation = has_validation
        self.epoch_count = epoch_count
        self.first_epoch = first_epoch
        self.events: list[Event] = []
        self.state = INITIAL_STATE
        self.index = 0
        self.stack: list[str] = []
        self.fit_ends = 0
        self.phases_in_epoch: list[str] = []
        self.steps_in_batch = 0
        # Invariant 4 and 6 state (entries only).
        self.last_epoch_start: int | None = None
        self.epoch_index: int | None = None
        self.scope_epoch: int | None = None
        self.phase_batch: int | None = None
        self.batch_taken: int | None = None
        self.scope_batch: int | None = None
        self.stop_reason: str | None = None
        self.failed = False

    def fail(self, rule: int, detail: str, event: Event | None) -> TraceViolation:
        return TraceViolation(
            rule, detail, index=self.index, event=event, state=self.state, events=self.events
        )

    def run(self) -> None:
        entries = all(isinstance(item, TraceEntry) for item in self.items)
        table = _table()
        for index, item in enumerate(self.items):
            self.index = index
            event = _as_event(item, index, self.events, self.state)
            dest = table.get((self.state, event))
            if dest is None:
                raise self.fail(1, "the machine has no transition for this event here", event)
            self._check_scopes(event)
            self._check_steps(event)
            if entries:
                assert isinstance(item, TraceEntry)
                self._check_after_stop(event, item)
                self._check_indices(event, item)
            self.events.append(event)
            self.state = dest
        self.index = len(self.items)
        if self.items and self.state != FINAL_STATE:
            raise self.fail(
                1, f"the trace stops in {self.state!r} instead of {FINAL_STATE!r}", None
            )
        if self.stack:
            raise self.fail(2, f"scopes {self.stack} are still open", None)
        if self.items and self.fit_ends != 1:
            raise self.fail(2, f"fit_end fired {self.fit_ends} times, not once", None)

    def _check_scopes(self, event: Event) -> None:
        top = self.stack[-1] if self.stack else None
        if self.fit_ends:
            raise self.fail(2, "an event follows fit_end, which must be last", event)
        opened = SCOPE_OPENED.get(event)
        if opened is not None:
            if top not in _PARENT[opened]:
                raise self.fail(2, f"a {opened} scope cannot open inside {top or 'nothing'}", event)
            if opened == VALIDATION and self.has_validation is False:
                raise self.fail(2, "a validation phase ran in a fit without validation data", event)
            if opened in PHASES:
                if opened in self.phases_in_epoch or VALIDATION in self.phases_in_epoch:
                    raise self.fail(2, f"a second or late {opened} phase in one epoch", event)
                self.phases_in_epoch.append(opened)
            if opened == "epoch":
                self.phases_in_epoch = []
            if opened == "batch":
                self.steps_in_batch = 0
            self.stack.append(opened)
        closed = SCOPE_CLOSED.get(event)
        if closed is not None:
            if top != closed:
                raise self.fail(2, f"it closes {closed} but the open scope is {top}", event)
            self.stack.pop()
            if event is Event.FIT_END:
                self.fit_ends += 1

    def _check_steps(self, event: Event) -> None:
        phase = _STEPS.get(event)
        if phase is None:
            return
        inside = self.stack[-2:] == [phase, "batch"]
        if not inside:
            raise self.fail(3, f"{event.value} fired outside a {phase} batch", event)
        self.steps_in_batch += 1
        if self.steps_in_batch > 1:
            raise self.fail(3, f"{event.value} fired twice in one batch", event)

    def _check_after_stop(self, event: Event, entry: TraceEntry) -> None:
        if self.stop_reason is not None:
            if entry.stop_reason != self.stop_reason:
                raise self.fail(
                    6,
                    f"stop_reason changed from {self.stop_reason!r} to {entry.stop_reason!r}",
                    event,
                )
            if event not in END_EVENTS:
                raise self.fail(
                    6, f"a start event fired after the stop {self.stop_reason!r}", event
                )
        if self.failed and not entry.failed:
            raise self.fail(6, "the failure was forgotten (failed went back to false)", event)
        if entry.failed and event not in END_EVENTS:
            raise self.fail(6, "a start event fired after the loop failed", event)
        self.stop_reason = entry.stop_reason
        self.failed = entry.failed

    def _check_indices(self, event: Event, entry: TraceEntry) -> None:
        epoch, batch = entry.epoch_index, entry.batch_index
        if self.epoch_index is None and epoch != self.first_epoch:
            raise self.fail(
                4, f"the fit starts at epoch_index {epoch}, not {self.first_epoch}", event
            )
        if self.epoch_index is not None and epoch < self.epoch_index:
            raise self.fail(4, f"epoch_index went back from {self.epoch_index} to {epoch}", event)
        self.epoch_index = epoch
        if event is Event.EPOCH_START:
            floor = self.first_epoch if self.last_epoch_start is None else self.last_epoch_start + 1
            if epoch < floor:
                raise self.fail(
                    4, f"epoch_start has epoch_index {epoch}, expected >= {floor}", event
                )
            if self.epoch_count is not None and epoch >= self.epoch_count:
                raise self.fail(
                    4, f"epoch_index {epoch} is past the last epoch ({self.epoch_count - 1})", event
                )
            self.last_epoch_start = self.scope_epoch = epoch
        elif ("epoch" in self.stack or event is Event.EPOCH_END) and epoch != self.scope_epoch:
            raise self.fail(4, f"epoch_index is {epoch} inside epoch {self.scope_epoch}", event)
        if event in (Event.TRAINING_START, Event.VALIDATION_START):
            if batch != 0:
                raise self.fail(4, f"the phase opens with batch_index {batch}, not 0", event)
            self.phase_batch, self.batch_taken = 0, None
        phase = next((s for s in reversed(self.stack) if s in PHASES), None)
        if phase is not None or event in (Event.TRAINING_END, Event.VALIDATION_END):
            self._check_batch_index(event, entry, phase)

    def _check_batch_index(self, event: Event, entry: TraceEntry, phase: str | None) -> None:
        batch = entry.batch_index
        expected_training = phase == TRAINING or event is Event.TRAINING_END
        if entry.is_training != expected_training:
            raise self.fail(4, f"is_training is {entry.is_training} in a {phase} phase", event)
        assert self.phase_batch is not None
        if batch < self.phase_batch:
            raise self.fail(4, f"batch_index went back from {self.phase_batch} to {batch}", event)
        self.phase_batch = batch
        if event is Event.BATCH_START:
            if self.batch_taken is not None and batch <= self.batch_taken:
                raise self.fail(
                    4, f"batch_start has batch_index {batch} after batch {self.batch_taken}", event
                )
            self.batch_taken = self.scope_batch = batch
        elif (self.stack[-1] == "batch" or event is Event.BATCH_END) and batch != self.scope_batch:
            raise self.fail(4, f"batch_index is {batch} inside batch {self.scope_batch}", event)


def assert_valid_trace(
    entries: Sequence[TraceEntry | Event | str],
    *,
    has_validation: bool | None = None,
    epoch_count: int | None = None,
    first_epoch: int = 0,
) -> None:
    """Raise :class:`TraceViolation` unless ``entries`` keeps the lifecycle invariants.

    ``entries`` is what a ``TraceRecorder`` recorded (``recorder.entries``), or bare
    events (``recorder.events``, or their string values); with bare events only
    invariants 1 to 3 can be checked. What is checked, at each position in order:

    1. The event is a transition of the lifecycle machine from the state the trace
       has reached (table read off ``build_machine``), and a non-empty trace ends in
       ``done``. An empty trace is valid: ``fit_start`` was vetoed or stopped.
    2. Each start opens a scope inside the right parent (epoch in fit, phase in
       epoch, batch in phase), each end closes the innermost open scope, at most one
       training then at most one validation phase per epoch, nothing follows
       ``fit_end`` and it fires exactly once. ``has_validation=False`` forbids a
       validation phase; ``True`` or ``None`` allows one (guards may skip it).
    3. ``update_start`` only with a training batch innermost,
       ``inference_prediction_end`` only with a validation batch, once per batch.
    4. (entries) ``epoch_index`` never decreases and is ``first_epoch`` at
       ``fit_start``; each ``epoch_start`` has an index at least one above the
       previous taken epoch (exactly one unless epochs in between were vetoed, which
       a trace cannot show) and at least ``first_epoch``, below ``epoch_count`` when
       given; every entry inside an epoch, its ``epoch_end`` included, has that
       epoch's index. Each phase start has ``batch_index`` 0; inside a phase
       ``batch_index`` never decreases, taken ``batch_start`` indices are strictly
       increasing (a vetoed batch still uses its index), every entry of a batch has
       its ``batch_start``'s index, and ``is_training`` tells the phase.
    6. (entries) After the first entry with ``stop_reason`` set, every later entry
       is an end event with the same ``stop_reason``; every entry recorded with
       ``failed`` set is an end event, and ``failed`` never goes back to false.
    """
    _Checker(entries, has_validation, epoch_count, first_epoch).run()

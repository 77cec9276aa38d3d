"""The policy both engines share: guards, decisions, observers, records, the wind-down.

An engine moves the lifecycle machine; *how* it moves it is the engine's own
(:mod:`statemachine_loop.dispatch`). Everything else about a proposal is here, once:
running every guard and settling their decisions by precedence, checking that each
decision is legal where it was taken, agreeing decisions across ranks, calling the
observers, and firing the end events of every open scope when the loop winds down.

The engine reports what happened to the fit's :class:`~statemachine_loop.run_state.RunState`
(each decision, the stop reason) and hands hooks the loop's
:class:`~statemachine_loop.view.LoopView`; it writes nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

from statemachine_loop.callback import NO_HOOKS, HookMap
from statemachine_loop.decisions import (
    Decision,
    DecisionRecord,
    Redirect,
    Stop,
    Veto,
    kind_of,
    resolve,
)
from statemachine_loop.errors import IllegalRedirectError, LifecycleError
from statemachine_loop.events import END_EVENTS, Event
from statemachine_loop.machine import (
    INITIAL_STATE,
    REDIRECT_TARGETS,
    MachineModel,
    build_machine,
    transition_table,
    wind_down_paths,
)
from statemachine_loop.run_state import RunState

if TYPE_CHECKING:
    from transitions import Machine

    from statemachine_loop.distributed import Collective
    from statemachine_loop.view import LoopView

__all__ = ["Engine", "EntryWork", "HookError", "Stopping"]

#: The loop's own work when an event is proposed, before its guards (see ``Engine.bind``).
EntryWork = Mapping[Event, Callable[[], None]]
#: A hook exception collected during the wind-down: the error, the callback, the event.
HookError = tuple[BaseException, str, Event]
#: A decision with the callback that took it and, under torch.distributed, its rank.
_Decided = tuple[str, Decision, int | None]


class Stopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Private signal: a ``Stop`` was applied and the driver must wind down."""


class Engine:
    """Shared policy of both engines; subclasses implement :meth:`propose`."""

    name: ClassVar[str]
    #: What hooks are called with; set by :meth:`bind` (no hook runs before it).
    _view: LoopView

    def __init__(self) -> None:
        self.model = MachineModel()
        self.machine: Machine = self._build_machine()
        self._table = transition_table(self.machine)
        self._paths = wind_down_paths(self.machine)
        self._guards = NO_HOOKS.guards
        self._observers = NO_HOOKS.observers
        self._stoppers = NO_HOOKS.stoppers
        self._run = RunState()
        self.collective: Collective | None = None
        self._entries: EntryWork = {}
        self._can_validate = False
        self.winding_down = False
        self.hook_errors: list[HookError] = []
        #: The state the last taken transition left; observers read it as ``previous_state``.
        self.source = INITIAL_STATE
        self.model.state = INITIAL_STATE

    def _build_machine(self) -> Machine:
        return build_machine(self.model)

    @property
    def state(self) -> str:
        """The machine's current state."""
        return self.model.state

    def bind(
        self,
        hooks: HookMap,
        entries: EntryWork,
        *,
        view: LoopView,
        run: RunState,
        can_validate: bool,
        collective: Collective | None = None,
    ) -> None:
        """Prepare for one ``fit``: its hooks, the loop's entry work, and the machine at idle.

        ``entries`` is the loop's own work that must be done when an event is
        proposed, before its guards (a phase start sets the mode and ``batch_count``;
        a phase end finalises metrics), whoever proposes it: the driver, a redirect
        or the wind-down. Hooks are called with ``view``; decisions and the stop
        reason are reported to ``run``. With a ``collective``, every decision is
        agreed across ranks before it takes effect.
        """
        self._guards, self._observers = hooks.guards, hooks.observers
        self._stoppers = hooks.stoppers
        self._view, self._run = view, run
        self.collective = collective
        self._entries = entries
        self._can_validate = can_validate
        self.winding_down = False
        self.hook_errors = []
        self.source = self.model.state = INITIAL_STATE
        self._compile(hooks, entries)

    def _compile(self, hooks: HookMap, entries: EntryWork) -> None:
        """Precompute what the engine needs per event; nothing for the reference engine."""

    def propose(self, event: Event) -> Event | None:
        """Propose ``event``: return the event taken, or ``None`` if it was vetoed.

        A redirect returns whatever its target's proposal took (a redirect of
        ``update_start`` or ``inference_prediction_end`` to ``batch_end`` acts as a
        veto and returns ``None``). An applied ``Stop`` raises :class:`Stopping`
        once the machine is where the stop leaves it.
        """
        raise NotImplementedError

    def proposer(self, event: Event) -> Callable[[], Event | None]:
        """:meth:`propose` of ``event`` as a function of no arguments, for this fit.

        The driver asks once per fit for the events it proposes on every batch.
        """
        return functools.partial(self.propose, event)

    def wind_down(self) -> list[HookError]:
        """Fire the end events of every open scope, innermost first, on the machine's path.

        Decisions are recorded as ignored and hook exceptions are collected, not
        raised, so every remaining end event fires. Returns the collected
        ``(exception, callback name, event)`` in order.
        """
        self.winding_down = True
        self.hook_errors = []
        try:
            for event in self._paths[self.model.state]:
                self.propose(event)
        finally:
            self.winding_down = False
        return self.hook_errors

    # -- guards ----------------------------------------------------------------------

    def _illegal(self, state: str, event: Event) -> LifecycleError:
        legal = sorted(e.value for (source, e) in self._table if source == state)
        return LifecycleError(
            f"Event {event.value!r} cannot be taken from state {state!r}; "
            f"the events legal there are {legal}."
        )

    def _failed(self, exc: BaseException, name: str, event: Event) -> None:
        """A hook raised: outside the wind-down re-raise, inside it collect and go on."""
        if not self.winding_down:
            raise exc
        self.hook_errors.append((exc, name, event))

    def _enter(self, event: Event, entry: Callable[[], None]) -> None:
        try:
            entry()
        except BaseException as exc:
            self._failed(exc, "TrainingLoop", event)

    def _decide(self, event: Event, state: str) -> Decision | None:
        """Run every guard of ``event``, validate and record their decisions, return the winner."""
        local: list[tuple[str, Decision]] = []
        for name, guard in self._guards[event]:
            try:
                decision = guard(self._view)
                if decision is not None:
                    _check_decision_type(event, name, decision)
                    local.append((name, decision))
            except BaseException as exc:
                if not self.winding_down:  # the decisions already taken are still recorded
                    for taken in local:
                        self._record(event, state, (*taken, None), applied=False, why="failure")
                self._failed(exc, name, event)
        if self.winding_down:
            for taken in local:
                self._record(event, state, (*taken, None), applied=False, why="wind-down")
            return None
        decided = self._agree(local)
        if not decided:
            return None
        try:
            for name, decision, _ in decided:
                self._check_guard_decision(event, state, name, decision)
            winner, applied = resolve(event, [(_shown(n, r), d) for n, d, r in decided])
        except LifecycleError:
            # Every decision is recorded, the refused ones too, before the error winds down.
            for item in decided:
                self._record(event, state, item, applied=False, why="refused")
            raise
        for item, was_applied in zip(decided, applied, strict=True):
            why = None if was_applied else "outranked"
            self._record(event, state, item, applied=was_applied, why=why)
        if isinstance(winner, Stop):
            self._set_stop_reason(winner, decided, event)
        return winner

    def _agree(self, local: list[tuple[str, Decision]]) -> list[_Decided]:
        """This rank's decisions, or under torch.distributed the union of every rank's."""
        if self.collective is None:
            return [(name, decision, None) for name, decision in local]
        return [(name, decision, rank) for name, decision, rank in self.collective.agree(local)]

    def _check_guard_decision(
        self, event: Event, state: str, name: str, decision: Decision
    ) -> None:
        if isinstance(decision, Stop):
            return
        kind = kind_of(decision).value
        if event in END_EVENTS:
            raise LifecycleError(
                f"Callback {name} returned {kind} on {event.value!r} in state {state!r}; "
                f"a scope end cannot be vetoed or redirected (only Stop is allowed there)."
            )
        if isinstance(decision, Redirect):
            allowed = tuple(
                target
                for target in REDIRECT_TARGETS.get((state, event), ())
                if target is not Event.VALIDATION_START or self._can_validate
            )
            if decision.event not in allowed:
                raise IllegalRedirectError(
                    f"Callback {name} redirected {event.value!r} in state {state!r} to "
                    f"{decision.event.value!r}; the allowed targets there are "
                    f"{[target.value for target in allowed]}."
                )

    # -- observers -------------------------------------------------------------------

    def observe(self, event: Event) -> Stop | None:
        """Call every observer of ``event``, which the machine has just taken.

        Returns the applied ``Stop``, if any; a proposal then raises
        :class:`Stopping`. The event has happened, so every observer sees it even when
        one raises: the first exception is raised after the last observer, later ones
        attached as notes (during the wind-down they are collected instead). In a
        single process a ``Stop`` is recorded, and ``stop_reason`` set, at once, so the
        observers after it (``Checkpoint`` runs last) know the loop is stopping; under
        ``torch.distributed`` that waits until the ranks agreed, after the last, and
        an event that an observer may stop always joins the agreement.
        """
        view, stoppers = self._view, self._stoppers[event]
        at_once = self.collective is None and not self.winding_down
        stops: list[tuple[str, Decision]] = []
        raised: list[tuple[BaseException, str]] = []
        for name, observer in self._observers[event]:
            try:
                result = observer(view)
                if result is None:
                    continue
                _check_observer_result(event, name, result, stoppers)
            except BaseException as exc:
                raised.append((exc, name))
                continue
            assert isinstance(result, Stop)
            stops.append((name, result))
            if at_once:
                item = (name, result, None)
                self._record(event, self.model.state, item, applied=True, from_observer=True)
                self._set_stop_reason(result, [(name, result, None)], event)
        if raised:
            self._observers_raised(event, raised)
        if not stops and (self.collective is None or not stoppers or self.winding_down):
            return None
        return self._settle_stops(event, stops, at_once=at_once)

    def _observers_raised(self, event: Event, raised: list[tuple[BaseException, str]]) -> None:
        if self.winding_down:
            for exc, name in raised:
                self.hook_errors.append((exc, name, event))
            return
        first = raised[0][0]
        for later, name in raised[1:]:
            first.add_note(
                f"Observer {name} also raised at {event.value}: {type(later).__name__}: {later}"
            )
        raise first

    def _settle_stops(
        self, event: Event, stops: list[tuple[str, Decision]], *, at_once: bool
    ) -> Stop | None:
        """The observers' stops: ignored in the wind-down, else agreed and applied."""
        state = self.model.state
        if self.winding_down:
            for name, stop in stops:
                item = (name, stop, None)
                self._record(event, state, item, applied=False, why="wind-down", from_observer=True)
            return None
        decided: list[_Decided]
        if at_once:  # already recorded, one by one
            decided = [(name, stop, None) for name, stop in stops]
        else:
            decided = self._agree(stops)
            for agreed in decided:
                self._record(event, state, agreed, applied=True, from_observer=True)
        if not decided:
            return None
        winner = decided[0][1]
        assert isinstance(winner, Stop)
        self._set_stop_reason(winner, decided, event)
        return winner

    # -- carrying out and recording --------------------------------------------------

    def _follow(self, event: Event, decision: Decision) -> Event | None:
        """Carry out a decision that kept ``event`` from being taken."""
        if isinstance(decision, Stop):
            raise Stopping
        if isinstance(decision, Redirect) and decision.event is not Event.BATCH_END:
            return self.propose(decision.event)
        return None

    def _set_stop_reason(self, stop: Stop, decided: list[_Decided], event: Event) -> None:
        if self._run.stop_reason is not None:
            return
        name, _, rank = next(item for item in decided if item[1] is stop)
        where = "" if rank is None else f" on rank {rank}"
        self._run.stopping(stop.reason or f"{name} stopped the loop at {event.value}{where}")

    def _record(
        self,
        event: Event,
        state: str,
        decided: _Decided,
        *,
        applied: bool,
        why: str | None = None,
        from_observer: bool = False,
    ) -> None:
        name, decision, rank = decided
        run = self._run
        run.decided(
            DecisionRecord(
                event=event,
                callback=name,
                kind=kind_of(decision),
                reason=decision.reason,
                target=decision.event if isinstance(decision, Redirect) else None,
                applied=applied,
                ignored_because=why,
                state=state,
                epoch_index=run.epoch_index,
                batch_index=run.batch_index,
                from_observer=from_observer,
                rank=rank,
            )
        )


def _shown(name: str, rank: int | None) -> str:
    return name if rank is None else f"{name} (rank {rank})"


def _check_decision_type(event: Event, name: str, decision: object) -> None:
    if not isinstance(decision, Veto | Redirect | Stop):
        raise LifecycleError(
            f"Guard guard_{event.value} of {name} returned {decision!r}; a guard must "
            "return None, Veto(reason), Redirect(event, reason) or Stop(reason)."
        )


def _check_observer_result(
    event: Event, name: str, result: object, stoppers: frozenset[str]
) -> None:
    if not isinstance(result, Stop) or name not in stoppers:
        raise LifecycleError(
            f"Observer on_{event.value} of {name} returned {result!r}; an observer may "
            "return only None or Stop(reason), and only if its callback's may_stop is true."
        )

"""The engines that move the lifecycle machine and call the hooks.

Both engines share every piece of policy — running guards, settling decisions,
validating them, recording them, calling observers, winding down — and differ only
in how the machine moves:

* :class:`CompiledEngine` (the default) looks legality up in a table read off the
  ``transitions`` machine and sets the machine model's state itself; per event it
  touches only the hooks that callbacks define. About a microsecond per event.
* :class:`TransitionsEngine` (the reference) fires every event through
  ``Machine.trigger``, with the guards as the transition's ``conditions`` and the
  observers as its ``after`` callbacks. About ten microseconds per event.

The property tests run random lifecycles through both and require identical
traces and decisions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from transitions import MachineError

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
from statemachine_loop.events import ALL_EVENTS, END_EVENTS, Event
from statemachine_loop.machine import (
    INITIAL_STATE,
    REDIRECT_TARGETS,
    MachineModel,
    build_machine,
    transition_table,
    wind_down_paths,
)

if TYPE_CHECKING:
    from transitions import Machine

    from statemachine_loop.distributed import Collective
    from statemachine_loop.loop import TrainingLoop

__all__ = ["ENGINES", "CompiledEngine", "Engine", "Stopping", "TransitionsEngine"]

#: A compiled event: its moves ``{source: destination}``, entry work, whether it is
#: guarded, observed, or bare (none of these: the proposal is only the move).
_Plan = tuple[dict[str, str], Callable[[], None] | None, bool, bool, bool]

#: How the driver calls an event's observers itself (:meth:`Engine.observer_call`): the
#: call, and what settles a result other than ``None`` into the ``Stop`` to follow.
ObserverCall = tuple[Callable[[], object], Callable[[object], "Stop | None"]]

#: A decision with the callback that took it and, under torch.distributed, its rank.
_Decided = tuple[str, Decision, int | None]


class Stopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Private signal: a ``Stop`` was applied and the driver must wind down."""


class Engine:
    """Shared policy of both engines; subclasses implement :meth:`propose`."""

    name: ClassVar[str]

    def __init__(self, loop: TrainingLoop) -> None:
        self._loop = loop
        self.model = MachineModel()
        self.machine: Machine = self._build_machine()
        self._table = transition_table(self.machine)
        self._paths = wind_down_paths(self.machine)
        self._guards = NO_HOOKS.guards
        self._observers = NO_HOOKS.observers
        self._stoppers = NO_HOOKS.stoppers
        self.collective: Collective | None = None
        self._entries: Mapping[Event, Callable[[], None]] = {}
        self._can_validate = False
        self.winding_down = False
        self.hook_errors: list[tuple[BaseException, str, Event]] = []
        #: The state the last taken transition left; observers read it as ``previous_state``.
        self.source = INITIAL_STATE

    def _build_machine(self) -> Machine:
        return build_machine(self.model)

    def bind(
        self,
        hooks: HookMap,
        entries: Mapping[Event, Callable[[], None]],
        *,
        can_validate: bool,
        collective: Collective | None = None,
    ) -> None:
        """Prepare for one ``fit``: its hooks, the loop's entry work, and the machine at idle.

        ``entries`` is the loop's own work that must be done when an event is
        proposed, before its guards (a phase start sets the mode and ``batch_count``;
        a phase end finalises metrics), whoever proposes it: the driver, a redirect
        or the wind-down. With a ``collective``, every decision is agreed across ranks
        before it takes effect.
        """
        self._guards = hooks.guards
        self._observers = hooks.observers
        self._stoppers = hooks.stoppers
        self.collective = collective
        self._entries = entries
        self._can_validate = can_validate
        self.winding_down = False
        self.hook_errors = []
        self.source = INITIAL_STATE
        # What ``machine.set_state(INITIAL_STATE, model=...)`` does, minus its lookups;
        # the machine reads its model's ``state`` attribute, as every move here writes it.
        self.model.state = INITIAL_STATE
        self._compile(hooks, entries)

    def _compile(self, hooks: HookMap, entries: Mapping[Event, Callable[[], None]]) -> None:
        """Precompute what the engine needs per event; nothing for the reference engine."""

    def bare_moves(self, events: Sequence[Event], state: str) -> tuple[str, ...] | None:
        """The states ``events``, proposed in turn from ``state``, would lead through.

        Only when proposing each of them would do nothing but move the machine — no
        entry work, no guard, no observer — so the driver may move it itself;
        otherwise ``None``. The reference engine always answers ``None``: it fires
        every event through ``Machine.trigger``.
        """
        return None

    def destination(self, event: Event, state: str) -> str | None:
        """The state ``event`` leads to from ``state``, per the machine; ``None`` if illegal."""
        return self._table.get((state, event))

    def observed_move(self, event: Event, state: str) -> tuple[str, ObserverCall | None] | None:
        """Where proposing ``event`` from ``state`` leads, and how to call its observers.

        Only when the proposal would do nothing but move the machine and call the
        event's observers — no entry work, no guard — so the driver may move it
        itself and call them: the second item is :meth:`observer_call`'s pair,
        or ``None`` when nothing observes the event. Otherwise ``None``. The
        reference engine always answers ``None``.
        """
        return None

    def observer_call(self, event: Event) -> ObserverCall:
        """:meth:`observe` of ``event`` for the driver's per-batch calls, in two parts.

        ``call()`` runs this fit's observers of ``event``; when it returns anything but
        ``None``, ``settle(result)`` applies the policy and returns the ``Stop`` to
        follow, or ``None``. With a single observer (one logger: the common case)
        ``call`` is that observer bound to the loop by ``functools.partial``, so a
        batch pays no Python frame around it, and an exception it raises propagates
        just as :meth:`observe` would re-raise it (the driver's per-batch path never
        runs during a wind-down). Otherwise ``call`` is :meth:`observe` itself, whose
        result ``settle`` passes on.
        """
        observers = self._observers[event]
        if len(observers) != 1 or (self.collective is not None and self._stoppers[event]):
            return functools.partial(self.observe, event), _settled
        ((_, observer),) = observers
        return functools.partial(observer, self._loop), functools.partial(self._settle, event)

    def _settle(self, event: Event, result: object) -> Stop | None:
        """Apply the policy to what the lone observer of ``event`` returned (not ``None``)."""
        return self._observe_from(event, 0, result=result)

    def propose(self, event: Event) -> Event | None:
        """Propose ``event``: return the event taken, or ``None`` if it was vetoed.

        A redirect returns whatever its target's proposal took (a redirect of
        ``update_start`` or ``inference_prediction_end`` to ``batch_end`` acts as a
        veto and returns ``None``). An applied ``Stop`` raises :class:`Stopping`
        once the machine is where the stop leaves it.
        """
        raise NotImplementedError

    def wind_down(self) -> list[tuple[BaseException, str, Event]]:
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

    # -- shared policy ---------------------------------------------------------------

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
        loop = self._loop
        local: list[tuple[str, Decision]] = []
        for name, guard in self._guards[event]:
            try:
                decision = guard(loop)
                if decision is not None:
                    _check_decision_type(event, name, decision)
                    local.append((name, decision))
            except BaseException as exc:
                if not self.winding_down:  # the decisions already taken are still recorded
                    for taken_name, taken in local:
                        self._record(
                            event, state, (taken_name, taken, None), applied=False, why="failure"
                        )
                self._failed(exc, name, event)
        if self.winding_down:
            for name, decision in local:
                self._record(event, state, (name, decision, None), applied=False, why="wind-down")
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
            self._record(
                event, state, item, applied=was_applied, why=None if was_applied else "outranked"
            )
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

    def observe(self, event: Event) -> Stop | None:
        """Call every observer of ``event``, which the machine has just taken.

        Returns the first applied ``Stop``; a proposal then raises :class:`Stopping`,
        and so does the driver when it moved the machine itself (:meth:`observed_move`).

        The event has happened, so every observer sees it even when one raises: the
        first exception is raised after the last observer, later ones attached as notes.
        In a single process a ``Stop`` is recorded, and ``stop_reason`` set, at once, so
        the observers after it (``Checkpoint`` runs last) know the loop is stopping;
        under ``torch.distributed`` that waits until the ranks agreed, after the last.

        The common case — outside the wind-down, every observer returning ``None`` —
        runs on a bare loop (this is on the per-batch path of every logger); the first
        observer that returns something or raises hands over, with its outcome, to
        :meth:`_observe_from`, which carries the full policy. Under
        ``torch.distributed`` an event that an observer may stop always takes the full
        path, because every rank must join the agreement.
        """
        observers = self._observers[event]
        if self.winding_down or (self.collective is not None and self._stoppers[event]):
            return self._observe_from(event, 0)
        loop = self._loop
        for index, (_, observer) in enumerate(observers):
            try:
                result = observer(loop)
            except BaseException as exc:
                return self._observe_from(event, index, error=exc)
            if result is not None:
                return self._observe_from(event, index, result=result)
        return None

    def _observe_from(
        self,
        event: Event,
        start: int,
        *,
        result: object = None,
        error: BaseException | None = None,
    ) -> Stop | None:
        """:meth:`observe` from observer ``start`` on, whose outcome may be known.

        When ``result`` (not ``None``) or ``error`` is given, observer ``start``
        already returned or raised it and the observers before it returned ``None``;
        otherwise no observer has been called yet and ``start`` is 0.
        """
        known = error is not None or result is not None
        loop = self._loop
        stoppers = self._stoppers[event]
        at_once = self.collective is None and not self.winding_down
        stops: list[tuple[str, Decision]] = []
        raised: list[tuple[BaseException, str]] = []
        for index, (name, observer) in enumerate(self._observers[event][start:], start):
            try:
                if index == start and known:
                    known = False
                    if error is not None:
                        raise error
                else:
                    result = observer(loop)
                if result is None:
                    continue
                if not isinstance(result, Stop) or name not in stoppers:
                    raise LifecycleError(
                        f"Observer on_{event.value} of {name} returned {result!r}; an "
                        "observer may return only None or Stop(reason), and only if its "
                        "callback's may_stop is true."
                    )
                stops.append((name, result))
                if at_once:
                    self._record(
                        event,
                        self.model.state,
                        (name, result, None),
                        applied=True,
                        why=None,
                        from_observer=True,
                    )
                    self._set_stop_reason(result, [(name, result, None)], event)
            except BaseException as exc:
                if self.winding_down:
                    self._failed(exc, name, event)
                else:
                    raised.append((exc, name))
        if raised:
            first = raised[0][0]
            for later, name in raised[1:]:
                first.add_note(
                    f"Observer {name} also raised at {event.value}: {type(later).__name__}: {later}"
                )
            raise first
        state = self.model.state
        if self.winding_down:
            for name, stop in stops:
                self._record(
                    event,
                    state,
                    (name, stop, None),
                    applied=False,
                    why="wind-down",
                    from_observer=True,
                )
            return None
        decided: list[_Decided]
        if at_once:
            decided = [(name, stop, None) for name, stop in stops]
        else:
            decided = self._agree(stops) if stoppers else []
            for item in decided:
                self._record(event, state, item, applied=True, why=None, from_observer=True)
        if not decided:
            return None
        winner = decided[0][1]
        assert isinstance(winner, Stop)
        self._set_stop_reason(winner, decided, event)
        return winner

    def _follow(self, event: Event, decision: Decision) -> Event | None:
        """Carry out a decision that kept ``event`` from being taken."""
        if isinstance(decision, Stop):
            raise Stopping
        if isinstance(decision, Redirect) and decision.event is not Event.BATCH_END:
            return self.propose(decision.event)
        return None

    def _set_stop_reason(self, stop: Stop, decided: list[_Decided], event: Event) -> None:
        if self._loop.stop_reason is not None:
            return
        name, _, rank = next(item for item in decided if item[1] is stop)
        where = "" if rank is None else f" on rank {rank}"
        self._loop.stop_reason = stop.reason or f"{name} stopped the loop at {event.value}{where}"

    def _record(
        self,
        event: Event,
        state: str,
        decided: _Decided,
        *,
        applied: bool,
        why: str | None,
        from_observer: bool = False,
    ) -> None:
        loop = self._loop
        name, decision, rank = decided
        self._loop.decisions.append(
            DecisionRecord(
                event=event,
                callback=name,
                kind=kind_of(decision),
                reason=decision.reason,
                target=decision.event if isinstance(decision, Redirect) else None,
                applied=applied,
                ignored_because=why,
                state=state,
                epoch_index=loop.epoch_index,
                batch_index=loop.batch_index,
                from_observer=from_observer,
                rank=rank,
            )
        )


class CompiledEngine(Engine):
    """The default engine: table lookups and precomputed hook lists, no ``trigger`` calls.

    Binding compiles one plan per event — its moves read off the machine
    (``{source: destination}``), the loop's entry work, and whether any guard or
    observer hooks it — so a proposal costs one dict lookup for the plan, one for the
    move, and only the hook calls that exist.
    """

    name = "compiled"

    def __init__(self, loop: TrainingLoop) -> None:
        super().__init__(loop)
        moves: dict[Event, dict[str, str]] = {event: {} for event in ALL_EVENTS}
        for (source, event), dest in self._table.items():
            moves[event][source] = dest
        #: Per event, ``{source: destination}`` read off the machine (the same every fit).
        self._moves = moves
        self._plans: dict[Event, _Plan] = {}
        # Plans by the hooked events, for one mapping of entries (a loop's own, the
        # same every fit): a loop refitted with the same kinds of callbacks reuses them.
        self._plan_cache: dict[tuple[frozenset[Event], frozenset[Event]], dict[Event, _Plan]]
        self._plan_cache = {}
        self._planned_entries: Mapping[Event, Callable[[], None]] | None = None

    def _compile(self, hooks: HookMap, entries: Mapping[Event, Callable[[], None]]) -> None:
        if entries is not self._planned_entries:
            self._plan_cache, self._planned_entries = {}, entries
        key = (hooks.guarded, hooks.observed)
        plans = self._plan_cache.get(key)
        if plans is None:
            plans = {}
            for event in ALL_EVENTS:
                entry = entries.get(event)
                guarded, observed = event in hooks.guarded, event in hooks.observed
                bare = entry is None and not guarded and not observed
                plans[event] = (self._moves[event], entry, guarded, observed, bare)
            self._plan_cache[key] = plans
        self._plans = plans

    def bare_moves(self, events: Sequence[Event], state: str) -> tuple[str, ...] | None:
        """The states ``events`` lead through from ``state`` (see :meth:`Engine.bare_moves`)."""
        states: list[str] = []
        for event in events:
            moves, _, _, _, bare = self._plans[event]
            if not bare or state not in moves:
                return None
            state = moves[state]
            states.append(state)
        return tuple(states)

    def observed_move(self, event: Event, state: str) -> tuple[str, ObserverCall | None] | None:
        """See :meth:`Engine.observed_move`."""
        moves, entry, guarded, observed, _ = self._plans[event]
        if entry is not None or guarded or state not in moves:
            return None
        return moves[state], self.observer_call(event) if observed else None

    def propose(self, event: Event) -> Event | None:
        """Propose ``event`` (see :meth:`Engine.propose`)."""
        moves, entry, guarded, observed, bare = self._plans[event]
        model = self.model
        state = model.state
        dest = moves.get(state)
        if dest is None:
            raise self._illegal(state, event)
        if bare:  # no entry work and no hooks: the move is all there is
            self.source = state
            model.state = dest
            return event
        if entry is not None:
            self._enter(event, entry)
        decision = self._decide(event, state) if guarded else None
        if decision is None or (event in END_EVENTS and type(decision) is Stop):
            self.source = state
            model.state = dest
            stop = self.observe(event) if observed else None
            if (decision is not None or stop is not None) and not self.winding_down:
                raise Stopping
            return event
        return self._follow(event, decision)


class TransitionsEngine(Engine):
    """The reference engine: every event through ``Machine.trigger``.

    Guards run as the transition's condition (one condition that runs them all,
    since ``transitions`` stops at the first false condition while the contract
    runs every guard), observers as its ``after`` callback.
    """

    name = "transitions"

    def __init__(self, loop: TrainingLoop) -> None:
        self._pending: Decision | None = None
        self._observer_stop: Stop | None = None
        self._source = INITIAL_STATE
        super().__init__(loop)

    def _build_machine(self) -> Machine:
        return build_machine(self.model, condition=self._condition, after=self._after)

    def _condition(self, event: Event) -> bool:
        self._pending = self._decide(event, self.model.state) if self._guards[event] else None
        pending = self._pending
        return pending is None or (event in END_EVENTS and isinstance(pending, Stop))

    def _after(self, event: Event) -> None:
        self.source = self._source
        self._observer_stop = self.observe(event) if self._observers[event] else None

    def propose(self, event: Event) -> Event | None:
        """Propose ``event`` through ``Machine.trigger`` (see :meth:`Engine.propose`)."""
        state = self.model.state
        if (state, event) not in self._table:
            raise self._illegal(state, event)
        entry = self._entries.get(event)
        if entry is not None:
            self._enter(event, entry)
        self._pending = None
        self._observer_stop = None
        self._source = state
        try:
            taken = self.model.trigger(event.value, event)  # type: ignore[attr-defined]
        except MachineError:
            raise self._illegal(state, event) from None
        decision = self._pending
        if taken:
            if (decision is not None or self._observer_stop is not None) and not self.winding_down:
                raise Stopping
            return event
        assert decision is not None
        return self._follow(event, decision)


def _settled(result: object) -> Stop | None:
    """What :meth:`Engine.observe` returned: already the ``Stop`` to follow, or ``None``."""
    assert result is None or isinstance(result, Stop)
    return result


def _shown(name: str, rank: int | None) -> str:
    return name if rank is None else f"{name} (rank {rank})"


def _check_decision_type(event: Event, name: str, decision: object) -> None:
    if not isinstance(decision, Veto | Redirect | Stop):
        raise LifecycleError(
            f"Guard guard_{event.value} of {name} returned {decision!r}; a guard must "
            "return None, Veto(reason), Redirect(event, reason) or Stop(reason)."
        )


#: The engines by the name ``TrainingLoop(engine=...)`` accepts.
ENGINES: Mapping[str, type[Engine]] = {
    CompiledEngine.name: CompiledEngine,
    TransitionsEngine.name: TransitionsEngine,
}

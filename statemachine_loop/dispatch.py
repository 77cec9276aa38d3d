"""The two engines that move the lifecycle machine, and the names ``engine=`` accepts.

Both run the same policy (:mod:`statemachine_loop.policy`) and differ only in how the
machine moves:

* :class:`CompiledEngine` (the default) looks legality up in a table read off the
  ``transitions`` machine and sets the machine model's state itself; per event it
  touches only the hooks that callbacks define, worked out once per fit.
* :class:`TransitionsEngine` (the reference) fires every event through
  ``Machine.trigger``, with the guards as the transition's ``conditions`` and the
  observers as its ``after`` callbacks.

The property tests run random lifecycles through both and require identical
traces and decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from transitions import MachineError

from statemachine_loop.callback import HookMap
from statemachine_loop.decisions import Decision, Stop
from statemachine_loop.events import ALL_EVENTS, END_EVENTS, Event
from statemachine_loop.machine import INITIAL_STATE, build_machine
from statemachine_loop.policy import Engine, EntryWork, Stopping

if TYPE_CHECKING:
    from transitions import Machine

__all__ = ["ENGINES", "CompiledEngine", "TransitionsEngine"]

#: A compiled event: its moves ``{source: destination}``, the loop's entry work, and
#: whether guards and observers hook it.
_Plan = tuple[dict[str, str], Callable[[], None] | None, bool, bool]


class CompiledEngine(Engine):
    """The default engine: table lookups and precomputed hook lists, no ``trigger`` calls.

    Binding compiles one plan per event — its moves read off the machine, the loop's
    entry work, and whether any guard or observer hooks it — so a proposal costs a
    lookup for the plan, one for the move, and only the hook calls that exist. An
    event no callback hooks costs the same whatever other events are hooked.
    """

    name = "compiled"

    def __init__(self) -> None:
        super().__init__()
        moves: dict[Event, dict[str, str]] = {event: {} for event in ALL_EVENTS}
        for (source, event), dest in self._table.items():
            moves[event][source] = dest
        #: Per event, ``{source: destination}`` read off the machine (the same every fit).
        self._moves = moves
        self._plans: dict[Event, _Plan] = {}

    def _compile(self, hooks: HookMap, entries: EntryWork) -> None:
        self._plans = {
            event: (
                self._moves[event],
                entries.get(event),
                event in hooks.guarded,
                event in hooks.observed,
            )
            for event in ALL_EVENTS
        }

    def proposer(self, event: Event) -> Callable[[], Event | None]:
        """:meth:`propose` of ``event`` for this fit (see :meth:`Engine.proposer`).

        For an event with no entry work that no callback hooks, that is only the legality
        lookup and the move, which is all its proposal would do.
        """
        moves, entry, guarded, observed = self._plans[event]
        if entry is not None or guarded or observed:
            return super().proposer(event)
        model = self.model

        def move() -> Event:
            state = model.state
            try:
                model.state = moves[state]
            except KeyError:
                raise self._illegal(state, event) from None
            self.source = state
            return event

        return move

    def propose(self, event: Event) -> Event | None:
        """Propose ``event`` (see :meth:`Engine.propose`)."""
        moves, entry, guarded, observed = self._plans[event]
        model = self.model
        state = model.state
        dest = moves.get(state)
        if dest is None:
            raise self._illegal(state, event)
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

    def __init__(self) -> None:
        self._pending: Decision | None = None
        self._observer_stop: Stop | None = None
        self._source = INITIAL_STATE
        super().__init__()

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


#: The engines by the name ``TrainingLoop(engine=...)`` accepts.
ENGINES: Mapping[str, type[Engine]] = {
    CompiledEngine.name: CompiledEngine,
    TransitionsEngine.name: TransitionsEngine,
}

"""Callbacks: the user's hooks on the lifecycle machine's transitions.

A :class:`Callback` subclass hooks an event by defining ``guard_<event>(self, loop)``
(runs when the loop *proposes* the event, before the machine moves; returns ``None``
or a :class:`~statemachine_loop.Veto`, :class:`~statemachine_loop.Redirect` or
:class:`~statemachine_loop.Stop`) and/or ``on_<event>(self, loop)`` (runs after the
machine took the event; may return ``Stop``). A plain function ``fn(loop, event)``
is an observer of every event, as in the original ``TrainingLoop``.

:func:`collect_hooks` works out once, at ``fit`` time, which callbacks hook each
event, so the hot path touches only those.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import attrs

from statemachine_loop.errors import ConfigError
from statemachine_loop.events import ALL_EVENTS, BATCH_EVENTS, PHASE_END, Event

if TYPE_CHECKING:
    from statemachine_loop.decisions import Decision, Stop
    from statemachine_loop.view import LoopView

__all__ = [
    "NO_HOOKS",
    "Callback",
    "CallbackLike",
    "HookMap",
    "callback_name",
    "collect_hooks",
    "ordered_callbacks",
]

_GUARD_PREFIX = "guard_"
_OBSERVER_PREFIX = "on_"
_HOOK_NAMES = frozenset(
    f"{prefix}{event.value}" for event in Event for prefix in (_GUARD_PREFIX, _OBSERVER_PREFIX)
)
#: ``(event, guard name, observer name)`` per event, spelled once.
_HOOKS_BY_EVENT = tuple(
    (event, _GUARD_PREFIX + event.value, _OBSERVER_PREFIX + event.value) for event in ALL_EVENTS
)

#: Hooks of these events run at batch boundaries inside a phase: the batch events'
#: guards and observers, and a phase end's guards (a wind-down after a failed fetch
#: proposes the end at a batch boundary); a phase end's observers run after the phase.
_MID_PHASE_OBSERVED = frozenset(BATCH_EVENTS)
_MID_PHASE_GUARDED = _MID_PHASE_OBSERVED | frozenset(PHASE_END.values())


class Callback:
    """Base class for callbacks: define any ``guard_<event>`` and ``on_<event>`` methods.

    Only the hooks a subclass defines are called, and which ones is worked out once
    per ``fit``: a callback that wants a hook only in some configurations (per-batch
    logging at debug level, say) sets that attribute to ``None`` on the instance in
    ``__init__``, or makes it a property that returns ``None`` (read when each ``fit``
    starts, as ``ProgressBar.on_batch_end`` is), and the hot path never calls it. A
    method whose name starts with ``guard_`` or ``on_`` but names no event is refused
    at ``fit`` time (a typo would otherwise be silently ignored). Override :meth:`state_dict` and
    :meth:`load_state_dict` for state that must survive a checkpoint and resume.
    """

    #: Run after every other callback, whatever the list order: for callbacks that must
    #: see the others' work on the same event (``Checkpoint`` saves their state).
    runs_last: ClassVar[bool] = False
    #: Whether this callback's observers may return ``Stop``. Writers and recorders set
    #: it false: under ``torch.distributed`` their observers then need no collective.
    may_stop: ClassVar[bool] = True

    @property
    def name(self) -> str:
        """The name under which this callback's decisions are recorded (its class name)."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """The callback's resumable state; empty for stateless callbacks."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        if state:
            raise ConfigError(
                f"{self.name} has no resumable state but load_state_dict was given "
                f"keys {sorted(state)}; override load_state_dict to restore them."
            )


#: What ``callbacks=[...]`` accepts: a ``Callback`` or a plain observer ``fn(loop, event)``.
CallbackLike: TypeAlias = "Callback | Callable[[LoopView, Event], Stop | None]"

#: A bound hook: ``(callback name, fn(loop))``.
Hook: TypeAlias = "tuple[str, Callable[[LoopView], Decision | None]]"


@attrs.frozen
class HookMap:
    """Per event, the guards and observers of a list of callbacks, in callback order."""

    guards: dict[Event, tuple[Hook, ...]]
    observers: dict[Event, tuple[Hook, ...]]
    #: Per event, the names of the observers that may return ``Stop``.
    stoppers: dict[Event, frozenset[str]]
    #: The events with at least one guard, and with at least one observer.
    guarded: frozenset[Event] = attrs.field(init=False)
    observed: frozenset[Event] = attrs.field(init=False)

    @property
    def mid_phase(self) -> bool:
        """Whether any hook can run at a batch boundary inside a phase.

        There a hook may take a checkpoint, which needs the random state of the
        phase's start (see ``RunState.position``).
        """
        return not (
            self.guarded.isdisjoint(_MID_PHASE_GUARDED)
            and self.observed.isdisjoint(_MID_PHASE_OBSERVED)
        )

    @property
    def signature(self) -> list[tuple[str, int, int, int]]:
        """Per event, how many guards, observers and stopping observers hook it.

        Under ``torch.distributed`` every rank must give the same, or the ranks would
        wait in different collectives.
        """
        return [
            (
                event.value,
                len(self.guards[event]),
                len(self.observers[event]),
                len(self.stoppers[event]),
            )
            for event in ALL_EVENTS
        ]

    @guarded.default
    def _hooked_by_guards(self) -> frozenset[Event]:
        return frozenset(event for event, hooks in self.guards.items() if hooks)

    @observed.default
    def _hooked_by_observers(self) -> frozenset[Event]:
        return frozenset(event for event, hooks in self.observers.items() if hooks)


#: The hooks of no callbacks: what :func:`collect_hooks` answers for an empty list,
#: shared (nothing mutates a ``HookMap``), so a fit without callbacks builds none.
NO_HOOKS = HookMap(
    guards=dict.fromkeys(ALL_EVENTS, ()),
    observers=dict.fromkeys(ALL_EVENTS, ()),
    stoppers=dict.fromkeys(ALL_EVENTS, frozenset()),
)


def callback_name(callback: object) -> str:
    """The recorded name of a callback or plain-function observer."""
    if isinstance(callback, Callback):
        return callback.name
    return str(getattr(callback, "__qualname__", None) or type(callback).__name__)


#: Per ``Callback`` class, its attributes named like a hook that hook no event (weak
#: keys: a class defined at run time is not kept alive by having been checked).
_MISNAMED_HOOKS: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _check_hook_names(callback: Callback) -> None:
    cls = type(callback)
    misnamed = _MISNAMED_HOOKS.get(cls)
    if misnamed is None:  # once per class: dir() walks the whole class hierarchy
        misnamed = _MISNAMED_HOOKS[cls] = tuple(
            attribute
            for attribute in dir(cls)
            if attribute.startswith((_GUARD_PREFIX, _OBSERVER_PREFIX))
            and attribute not in _HOOK_NAMES
        )
    for attribute in misnamed:
        raise ConfigError(
            f"Callback {callback.name} defines {attribute!r}, which hooks no lifecycle "
            f"event; hooks are guard_<event> and on_<event> for the events "
            f"{', '.join(e.value for e in Event)}."
        )


def _function_observer(
    fn: Callable[[LoopView, Event], Stop | None], event: Event
) -> Callable[[LoopView], Decision | None]:
    def observe(loop: LoopView) -> Decision | None:
        return fn(loop, event)

    return observe


def collect_hooks(callbacks: Sequence[object]) -> HookMap:
    """Work out, once, which callbacks hook which event.

    Raises :class:`ConfigError` for an object that is neither a ``Callback`` nor
    callable, and for a ``Callback`` with a misspelled hook name.
    """
    if not callbacks:
        return NO_HOOKS
    # Filled by concatenation (an event has a handful of hooks at most).
    guards: dict[Event, tuple[Hook, ...]] = dict.fromkeys(ALL_EVENTS, ())
    observers: dict[Event, tuple[Hook, ...]] = dict.fromkeys(ALL_EVENTS, ())
    stoppers: dict[Event, frozenset[str]] = dict.fromkeys(ALL_EVENTS, frozenset())
    for callback in callbacks:
        name = callback_name(callback)
        if isinstance(callback, Callback):
            _check_hook_names(callback)
            for event, guard_name, observer_name in _HOOKS_BY_EVENT:
                guard = getattr(callback, guard_name, None)
                if guard is not None:
                    guards[event] += ((name, guard),)
                observer = getattr(callback, observer_name, None)
                if observer is not None:
                    observers[event] += ((name, observer),)
                    if callback.may_stop:
                        stoppers[event] |= {name}
        elif callable(callback):
            for event in ALL_EVENTS:
                observers[event] += ((name, _function_observer(callback, event)),)
                stoppers[event] |= {name}
        else:
            raise ConfigError(
                f"callbacks must hold Callback instances or functions fn(loop, event); "
                f"got {type(callback).__name__}: {callback!r}."
            )
    return HookMap(guards=guards, observers=observers, stoppers=stoppers)


def ordered_callbacks(*groups: Sequence[CallbackLike]) -> tuple[CallbackLike, ...]:
    """The callbacks of ``groups`` in the order their hooks run.

    The groups' order (the loop's own callbacks, then a fit's), except that callbacks
    whose class sets ``runs_last`` move to the end, keeping their relative order.
    """
    ordered = [callback for group in groups for callback in group]
    return (
        *(c for c in ordered if not getattr(c, "runs_last", False)),
        *(c for c in ordered if getattr(c, "runs_last", False)),
    )

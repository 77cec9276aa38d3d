"""What a hook may decide, how competing decisions are settled, and how they are recorded.

A guard returns ``None`` (go on) or one of :class:`Veto`, :class:`Redirect` and
:class:`Stop`; an observer may return :class:`Stop`. All guards of a proposal run,
and :func:`resolve` settles their decisions by precedence — ``Stop`` > ``Redirect``
> ``Veto`` > go on — never by "last writer wins". Every decision becomes a
:class:`DecisionRecord` in ``loop.decisions``, applied or not.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TypeAlias

import attrs

from statemachine_loop.errors import ConflictingDecisionsError
from statemachine_loop.events import Event

__all__ = [
    "Decision",
    "DecisionKind",
    "DecisionRecord",
    "Redirect",
    "Stop",
    "Veto",
    "resolve",
]


@attrs.frozen
class Veto:
    """Refuse the proposed event: the loop skips what it would have opened.

    Vetoing a scope end (``batch_end``, ``training_end``, ``validation_end``,
    ``epoch_end``, ``fit_end``) is a :class:`~statemachine_loop.LifecycleError`.
    """

    reason: str = ""


@attrs.frozen
class Redirect:
    """Take ``event`` instead of the proposed event.

    The target must be one the loop can perform from the current state (see the
    redirect table in the lifecycle docs); it is then proposed like any event.
    """

    event: Event = attrs.field(converter=Event)
    reason: str = ""


@attrs.frozen
class Stop:
    """Wind the loop down: close every open scope, innermost first, and return.

    On a start event the event is not taken; on a scope end the end is taken first.
    From an observer it takes effect at once.
    """

    reason: str = ""


#: Any decision a hook may return.
Decision: TypeAlias = Veto | Redirect | Stop


class DecisionKind(enum.StrEnum):
    """The kind of a recorded decision, ordered by precedence (``stop`` highest)."""

    VETO = "veto"
    REDIRECT = "redirect"
    STOP = "stop"


_KIND = {Veto: DecisionKind.VETO, Redirect: DecisionKind.REDIRECT, Stop: DecisionKind.STOP}
_RANK = {DecisionKind.VETO: 1, DecisionKind.REDIRECT: 2, DecisionKind.STOP: 3}


@attrs.frozen
class DecisionRecord:
    """One decision taken by one callback on one proposal, as kept in ``loop.decisions``.

    ``applied`` is false when the decision changed nothing: it was outranked by a
    decision of higher precedence, it came during the wind-down, the loop refused it
    as illegal, or a later guard of the same proposal raised; ``ignored_because``
    then says which (``"outranked"``, ``"wind-down"``, ``"refused"`` or
    ``"failure"``). Under ``torch.distributed`` every rank records the decisions of
    all ranks, ``rank`` saying whose it was.
    """

    event: Event
    callback: str
    kind: DecisionKind
    reason: str
    target: Event | None
    applied: bool
    ignored_because: str | None
    state: str
    epoch_index: int
    batch_index: int
    from_observer: bool = False
    rank: int | None = None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict, for logs and checkpoints."""
        return {
            "event": self.event.value,
            "callback": self.callback,
            "kind": self.kind.value,
            "reason": self.reason,
            "target": None if self.target is None else self.target.value,
            "applied": self.applied,
            "ignored_because": self.ignored_because,
            "state": self.state,
            "epoch_index": self.epoch_index,
            "batch_index": self.batch_index,
            "from_observer": self.from_observer,
            "rank": self.rank,
        }


def kind_of(decision: Decision) -> DecisionKind:
    """The :class:`DecisionKind` of a decision value."""
    return _KIND[type(decision)]


def resolve(
    event: Event, decided: Sequence[tuple[str, Decision]]
) -> tuple[Decision | None, list[bool]]:
    """Settle the decisions of one proposal's guards by precedence.

    ``decided`` holds ``(callback name, decision)`` in callback order. Returns the
    winning decision (the first one of the highest kind; ``None`` when nothing was
    decided) and, per entry, whether it was applied: every decision of the winning
    kind is, the outranked ones are not. Two redirects to different events raise
    :class:`ConflictingDecisionsError`.
    """
    if not decided:
        return None, []
    top = max(_RANK[kind_of(decision)] for _, decision in decided)
    winners = [(name, d) for name, d in decided if _RANK[kind_of(d)] == top]
    winner = winners[0][1]
    if isinstance(winner, Redirect):
        targets = {d.event for _, d in winners if isinstance(d, Redirect)}
        if len(targets) > 1:
            described = ", ".join(
                f"{name!r} -> {d.event.value}" for name, d in winners if isinstance(d, Redirect)
            )
            raise ConflictingDecisionsError(
                f"Guards of {event.value!r} redirected it to different events ({described}); "
                "two redirects of one proposal must agree on the target."
            )
    return winner, [_RANK[kind_of(d)] == top for _, d in decided]

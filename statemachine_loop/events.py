"""The twelve lifecycle events, and which scope each one opens or closes.

The events are exactly those of the original generalized training loop (Swift for
TensorFlow's ``TrainingLoop``, after fastai's ``Learner``). They are the only triggers
of the lifecycle machine (:mod:`statemachine_loop.machine`). Everything the library
knows about events as such — which close a scope, which run inside a batch, which
open and close each phase — is defined here once and imported everywhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, Literal, TypeAlias

__all__ = [
    "ALL_EVENTS",
    "BATCH_EVENTS",
    "END_EVENTS",
    "Event",
    "PHASES",
    "PHASE_END",
    "PHASE_OF_EVENT",
    "PHASE_START",
    "Phase",
    "SCOPE_CLOSED",
    "SCOPE_OPENED",
    "START_EVENTS",
    "Scope",
    "TRAINING",
    "VALIDATION",
]


class Event(enum.StrEnum):
    """One lifecycle event; its value is the ``snake_case`` name used in hooks and logs.

    A callback hooks an event with ``guard_<value>`` (before the machine moves) or
    ``on_<value>`` (after it moved); the value is also the trigger name on the
    ``transitions`` machine and the ``event`` field of structured logs.
    """

    FIT_START = "fit_start"
    FIT_END = "fit_end"
    EPOCH_START = "epoch_start"
    EPOCH_END = "epoch_end"
    TRAINING_START = "training_start"
    TRAINING_END = "training_end"
    VALIDATION_START = "validation_start"
    VALIDATION_END = "validation_end"
    BATCH_START = "batch_start"
    BATCH_END = "batch_end"
    UPDATE_START = "update_start"
    INFERENCE_PREDICTION_END = "inference_prediction_end"

    @property
    def is_scope_end(self) -> bool:
        """Whether the event closes a scope (fit, epoch, phase or batch).

        Scope ends cannot be vetoed or redirected; a ``Stop`` on one lets the end
        happen and then winds the loop down.
        """
        return self in END_EVENTS


#: Events that close a scope; the wind-down fires only these.
END_EVENTS: Final[frozenset[Event]] = frozenset(
    {
        Event.FIT_END,
        Event.EPOCH_END,
        Event.TRAINING_END,
        Event.VALIDATION_END,
        Event.BATCH_END,
    }
)

#: Events that open a scope or a step inside one: the ones a guard may veto.
START_EVENTS: Final[frozenset[Event]] = frozenset(Event) - END_EVENTS

#: Every event, in declaration order (a tuple: iterating it is cheaper than the enum).
ALL_EVENTS: Final[tuple[Event, ...]] = tuple(Event)

#: The events that fire inside a phase, once per batch or less: a hook of one of
#: them runs at batch boundaries (structured logs write them at debug level).
BATCH_EVENTS: Final[tuple[Event, ...]] = (
    Event.BATCH_START,
    Event.UPDATE_START,
    Event.INFERENCE_PREDICTION_END,
    Event.BATCH_END,
)

#: The two phases of an epoch, spelled as in ``History``, the logs and monitors.
Phase: TypeAlias = Literal["training", "validation"]
#: The training phase.
TRAINING: Final = "training"
#: The validation phase.
VALIDATION: Final = "validation"
#: Both phases, in the order an epoch runs them.
PHASES: Final[tuple[Phase, ...]] = (TRAINING, VALIDATION)

#: The event that opens each phase.
PHASE_START: Final[Mapping[Phase, Event]] = {
    TRAINING: Event.TRAINING_START,
    VALIDATION: Event.VALIDATION_START,
}
#: The event that closes each phase.
PHASE_END: Final[Mapping[Phase, Event]] = {
    TRAINING: Event.TRAINING_END,
    VALIDATION: Event.VALIDATION_END,
}
#: The phase each phase start or end belongs to.
PHASE_OF_EVENT: Final[Mapping[Event, Phase]] = {
    **{event: phase for phase, event in PHASE_START.items()},
    **{event: phase for phase, event in PHASE_END.items()},
}

#: The scopes of the lifecycle, outermost first.
Scope: TypeAlias = Literal["fit", "epoch", "training", "validation", "batch"]
#: The scope each start event opens (``update_start`` and
#: ``inference_prediction_end`` are steps inside a batch, not scopes).
SCOPE_OPENED: Final[Mapping[Event, Scope]] = {
    Event.FIT_START: "fit",
    Event.EPOCH_START: "epoch",
    Event.TRAINING_START: TRAINING,
    Event.VALIDATION_START: VALIDATION,
    Event.BATCH_START: "batch",
}
#: The scope each end event closes.
SCOPE_CLOSED: Final[Mapping[Event, Scope]] = {
    Event.FIT_END: "fit",
    Event.EPOCH_END: "epoch",
    Event.TRAINING_END: TRAINING,
    Event.VALIDATION_END: VALIDATION,
    Event.BATCH_END: "batch",
}

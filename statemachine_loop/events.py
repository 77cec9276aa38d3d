"""The twelve lifecycle events, and which scope each one opens or closes.

The events are exactly those of the original generalized training loop (Swift for
TensorFlow's ``TrainingLoop``, after fastai's ``Learner``). They are the only triggers
of the lifecycle machine (:mod:`statemachine_loop.machine`).
"""

from __future__ import annotations

import enum

__all__ = ["ALL_EVENTS", "END_EVENTS", "Event", "START_EVENTS"]


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
END_EVENTS: frozenset[Event] = frozenset(
    {
        Event.FIT_END,
        Event.EPOCH_END,
        Event.TRAINING_END,
        Event.VALIDATION_END,
        Event.BATCH_END,
    }
)

#: Events that open a scope or a step inside one: the ones a guard may veto.
START_EVENTS: frozenset[Event] = frozenset(Event) - END_EVENTS

#: Every event, in declaration order: a tuple, because iterating the enum class itself
#: goes through a Python generator each time, and ``fit`` does it dozens of times.
ALL_EVENTS: tuple[Event, ...] = tuple(Event)

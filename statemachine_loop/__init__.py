"""statemachine_loop: a PyTorch training loop whose lifecycle is a checked state machine.

The lifecycle — twelve events from ``fit_start`` to ``fit_end`` — is a ``transitions``
machine; callbacks are its transition hooks: guards that may veto, redirect or stop
a proposed event, and observers that act after it. What a hook may read from the loop
is :class:`LoopView`. See ``docs/lifecycle.md``.
"""

from statemachine_loop.callback import Callback
from statemachine_loop.decisions import DecisionKind, DecisionRecord, Redirect, Stop, Veto
from statemachine_loop.errors import (
    ConfigError,
    ConflictingDecisionsError,
    IllegalRedirectError,
    LifecycleError,
    LoopError,
    MissingDependencyError,
)
from statemachine_loop.events import Event
from statemachine_loop.history import History
from statemachine_loop.loop import TrainingLoop
from statemachine_loop.machine import lifecycle_diagram
from statemachine_loop.metrics import Metric
from statemachine_loop.schedules import Schedule, Segment
from statemachine_loop.step import Step
from statemachine_loop.view import LoopView

__all__ = [
    "Callback",
    "ConfigError",
    "ConflictingDecisionsError",
    "DecisionKind",
    "DecisionRecord",
    "Event",
    "History",
    "IllegalRedirectError",
    "LifecycleError",
    "LoopError",
    "LoopView",
    "Metric",
    "MissingDependencyError",
    "Schedule",
    "Segment",
    "Redirect",
    "Step",
    "Stop",
    "TrainingLoop",
    "Veto",
    "lifecycle_diagram",
]

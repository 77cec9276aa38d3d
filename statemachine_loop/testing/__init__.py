"""Test helpers for users' callbacks and for the loop itself.

``TraceRecorder`` records the events a loop takes; ``assert_valid_trace`` checks a
trace against the lifecycle machine and the contract's invariants (the checker lives
in :mod:`statemachine_loop.trace`). The conformance kit — ``check_callback``,
``check_example``, ``Example`` and ``ConformanceError``, from
:mod:`statemachine_loop.testing.conformance` — needs hypothesis, so those names are
imported on first use: ``import statemachine_loop.testing`` alone does not import it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from statemachine_loop.testing.recorder import TraceEntry, TraceRecorder
from statemachine_loop.trace import TraceViolation, assert_valid_trace, replay

if TYPE_CHECKING:
    from statemachine_loop.testing.conformance import (
        ConformanceError,
        Example,
        check_callback,
        check_example,
    )

__all__ = [
    "ConformanceError",
    "Example",
    "TraceEntry",
    "TraceRecorder",
    "TraceViolation",
    "assert_valid_trace",
    "check_callback",
    "check_example",
    "replay",
]

#: The conformance kit's names, imported (with hypothesis) when first read.
_CONFORMANCE = frozenset({"ConformanceError", "Example", "check_callback", "check_example"})


def __getattr__(name: str) -> Any:
    if name in _CONFORMANCE:
        return getattr(importlib.import_module("statemachine_loop.testing.conformance"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

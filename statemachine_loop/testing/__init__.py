"""Test helpers for users' callbacks and for the loop itself.

``TraceRecorder`` records the events a loop takes; the conformance kit builds on it.
"""

from statemachine_loop.testing.recorder import TraceEntry, TraceRecorder

__all__ = ["TraceEntry", "TraceRecorder"]

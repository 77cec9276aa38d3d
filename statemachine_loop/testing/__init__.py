"""Test helpers for users' callbacks and for the loop itself.

``TraceRecorder`` records the events a loop takes; ``assert_valid_trace`` checks a
trace against the lifecycle machine and the contract's invariants. The conformance
kit (``statemachine_loop.testing.conformance.check_callback``) and the Hypothesis
strategies (``statemachine_loop.testing.strategies``) need hypothesis, so they are
imported from their modules, not from here.
"""

from statemachine_loop.testing.invariants import TraceViolation, assert_valid_trace, replay
from statemachine_loop.testing.recorder import TraceEntry, TraceRecorder

__all__ = ["TraceEntry", "TraceRecorder", "TraceViolation", "assert_valid_trace", "replay"]

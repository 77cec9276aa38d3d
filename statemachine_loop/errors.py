"""The exceptions of ``statemachine_loop``: one root, and each subclass also a builtin.

Every error the library raises on purpose derives from :class:`LoopError`, so
``except LoopError`` catches exactly ours. Each subclass also inherits the builtin
exception with the same meaning (``ConfigError`` is a ``ValueError``), so code that
already catches builtins keeps working. Exceptions raised by the user's model, loss,
optimizer or callbacks are never wrapped: the loop winds down and re-raises them.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "MissingDependencyError",
    "ConflictingDecisionsError",
    "IllegalRedirectError",
    "LifecycleError",
    "LoopError",
]


class LoopError(Exception):
    """Root of every error raised by ``statemachine_loop`` itself."""


class ConfigError(LoopError, ValueError):
    """The loop was configured with a value it cannot run with.

    Raised before training starts (bad ``epochs``, an empty data set, an unknown
    metric) or at the first batch where the problem can only be seen then (a loss
    that is not a scalar, a batch that is not an ``(input, target)`` pair).
    """


class LifecycleError(LoopError, RuntimeError):
    """A hook broke the lifecycle contract.

    For example a guard vetoed or redirected a scope end, an observer returned a
    decision other than ``Stop``, a hook returned something that is not a decision,
    or an event was proposed where the machine has no transition for it.
    """


class IllegalRedirectError(LifecycleError, ValueError):
    """A guard redirected a proposal to an event the loop cannot take there.

    The message names the state, the proposed event, the requested target and the
    targets that are allowed from that state.
    """


class ConflictingDecisionsError(LifecycleError):
    """Two guards of the same proposal redirected it to different events.

    Precedence settles every other disagreement (``Stop`` > ``Redirect`` > ``Veto``);
    two different redirect targets cannot be settled, so the loop refuses to guess.
    """


class MissingDependencyError(LoopError, ImportError):
    """An optional feature needs a package that is not installed; the message says which.

    For example ``Schedule.plot`` needs matplotlib (the ``plot`` extra) and
    ``lifecycle_diagram("dot")`` needs graphviz (the ``diagrams`` extra).
    """

"""Built-in callbacks: logging and progress, checkpoints, and training control as hooks.

Each callback is imported from its module when its name is first read, so importing
the package (or the loop's default ``ProgressBar``) does not import the writers and
what they need (tensorboardX, structlog) until a fit uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from statemachine_loop.callbacks.checkpoint import Checkpoint
    from statemachine_loop.callbacks.csv_logger import CSVLogger
    from statemachine_loop.callbacks.early_stopping import EarlyStopping
    from statemachine_loop.callbacks.gradients import GradientAccumulation, GradientClipping
    from statemachine_loop.callbacks.guards import StopAfter, TerminateOnNaN
    from statemachine_loop.callbacks.precision import MixedPrecision
    from statemachine_loop.callbacks.progress import ProgressBar
    from statemachine_loop.callbacks.schedule import LearningRateScheduler
    from statemachine_loop.callbacks.structured import StructuredLogger
    from statemachine_loop.callbacks.tensorboard import TensorBoardLogger

__all__ = [
    "CSVLogger",
    "Checkpoint",
    "EarlyStopping",
    "GradientAccumulation",
    "GradientClipping",
    "LearningRateScheduler",
    "MixedPrecision",
    "ProgressBar",
    "StopAfter",
    "StructuredLogger",
    "TensorBoardLogger",
    "TerminateOnNaN",
]

#: The module of each callback, under this package.
_MODULES = {
    "CSVLogger": "csv_logger",
    "Checkpoint": "checkpoint",
    "EarlyStopping": "early_stopping",
    "GradientAccumulation": "gradients",
    "GradientClipping": "gradients",
    "LearningRateScheduler": "schedule",
    "MixedPrecision": "precision",
    "ProgressBar": "progress",
    "StopAfter": "guards",
    "StructuredLogger": "structured",
    "TensorBoardLogger": "tensorboard",
    "TerminateOnNaN": "guards",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""Built-in callbacks: logging and progress, checkpoints, and training control as hooks."""

from statemachine_loop.callbacks.checkpoint import Checkpoint
from statemachine_loop.callbacks.early_stopping import EarlyStopping
from statemachine_loop.callbacks.gradients import GradientAccumulation, GradientClipping
from statemachine_loop.callbacks.guards import StopAfter, TerminateOnNaN
from statemachine_loop.callbacks.precision import MixedPrecision
from statemachine_loop.callbacks.schedule import LearningRateScheduler

__all__ = [
    "Checkpoint",
    "EarlyStopping",
    "GradientAccumulation",
    "GradientClipping",
    "LearningRateScheduler",
    "MixedPrecision",
    "StopAfter",
    "TerminateOnNaN",
]

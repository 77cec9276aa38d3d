"""Built-in callbacks: logging and progress, checkpoints, and training control as hooks."""

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

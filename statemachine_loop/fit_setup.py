"""``FitSetup``: what one fit runs with, resolved once when it starts.

The loop's configuration (data, optimizer, loss, metrics, step, callbacks) meets the
fit's arguments (model, device, per-fit callbacks) here: the callbacks in the order
their hooks run and the hooks themselves, the device and the process group, and, under
``torch.distributed``, the wrapped model and each rank's shard of the data. The driver
iterates it and a checkpoint reads it; nothing changes it during the fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch

from statemachine_loop.callback import CallbackLike, HookMap
from statemachine_loop.distributed import (
    Collective,
    check_same_hooks,
    distribute_data,
    join_process_group,
    wrap_model,
)
from statemachine_loop.events import TRAINING, VALIDATION
from statemachine_loop.metrics import Metric
from statemachine_loop.precision import Precision
from statemachine_loop.preflight import move_optimizer_state, resolve_device
from statemachine_loop.step import LossFn, Step

__all__ = ["FitSetup", "prepare_fit"]


@attrs.frozen
class FitSetup:
    """The model, optimizer, loss, step, metrics, data and hooks of one fit."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    step: Step
    metrics: Sequence[Metric]
    training: Iterable[Any]
    validation: Iterable[Any] | None
    #: The fit's callbacks in the order their hooks run, and those hooks per event.
    callbacks: tuple[CallbackLike, ...]
    hooks: HookMap
    device: torch.device
    collective: Collective | None
    #: The loop's autocast factory and gradient scaler, which hooks may set.
    precision: Precision

    @property
    def datasets(self) -> tuple[Iterable[Any], ...]:
        """The fit's data sets: training, then validation when there is one."""
        if self.validation is None:
            return (self.training,)
        return (self.training, self.validation)


def prepare_fit(
    model: torch.nn.Module,
    device: str | torch.device,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    step: Step,
    metrics: Sequence[Metric],
    training: Iterable[Any],
    validation: Iterable[Any] | None,
    callbacks: tuple[CallbackLike, ...],
    hooks: HookMap,
    precision: Precision,
) -> FitSetup:
    """The fit's setup: the device and process group, the model and data placed on them.

    The model moves to the device when any of its tensors is elsewhere, and so does the
    optimizer's state. Under ``torch.distributed`` every rank must hook the same
    events, the model is wrapped in ``DistributedDataParallel`` and each rank reads
    its own shard of the data.
    """
    resolved = resolve_device(device)
    collective = join_process_group(resolved)
    if any(tensor.device != resolved for tensor in (*model.parameters(), *model.buffers())):
        model = model.to(resolved)
    if collective is not None:
        check_same_hooks(hooks.signature, collective)
        model = wrap_model(model, resolved)
        training = distribute_data(training, collective, name=TRAINING)
        if validation is not None:
            validation = distribute_data(validation, collective, name=VALIDATION)
    move_optimizer_state(optimizer, resolved)
    return FitSetup(
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        step=step,
        metrics=metrics,
        training=training,
        validation=validation,
        callbacks=callbacks,
        hooks=hooks,
        device=resolved,
        collective=collective,
        precision=precision,
    )

"""Checks of the user's configuration, done before anything runs.

Bad input must fail with a :class:`~statemachine_loop.ConfigError` that names the
argument, what was expected and what was given — never with a traceback from deep
inside torch. What can only be seen at the first batch (the loss's shape) is
checked for every batch by :func:`checked_loss`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sized
from typing import Any

import torch

from statemachine_loop.errors import ConfigError

__all__ = [
    "check_data",
    "length_of",
    "check_fit_arguments",
    "checked_loss",
    "move_optimizer_state",
    "resolve_device",
]


def check_data(name: str, data: object) -> None:
    """``data`` must be a non-empty iterable of batches (a tensor is not one)."""
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise ConfigError(
            f"{name} must be an iterable of batches such as a DataLoader; "
            f"got {type(data).__name__}."
        )
    if length_of(data) == 0:
        raise ConfigError(f"{name} holds no batches; give it at least one batch.")


def length_of(data: object) -> int | None:
    """How many batches ``data`` yields, or ``None`` when it cannot say.

    A ``DataLoader`` over an ``IterableDataset`` without ``__len__`` has ``__len__``
    itself but raises ``TypeError`` from it: that is "unknown", not an error.
    """
    if not isinstance(data, Sized):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def check_fit_arguments(model: object, epochs: object, optimizer: torch.optim.Optimizer) -> None:
    """``model`` a module whose parameters the optimizer holds; ``epochs`` an int >= 1."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1; got {epochs!r}.")
    ids = {id(parameter) for parameter in model.parameters()}
    foreign = sum(
        1 for group in optimizer.param_groups for p in group["params"] if id(p) not in ids
    )
    if foreign:
        raise ConfigError(
            f"The optimizer holds {foreign} parameter(s) that do not belong to the "
            f"model passed to fit ({type(model).__name__}); build the optimizer from "
            "this model's parameters()."
        )


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device``; CUDA must be available when asked for.

    A bare ``"cuda"`` means the GPU of this process's ``LOCAL_RANK`` under torchrun
    (the current device otherwise), which also becomes the current device, so nccl collectives and
    tensors created with ``device="cuda"`` land on the right GPU.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device; got {device!r}."
        ) from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was requested but CUDA is not available here.")
        if resolved.index is None:
            # Under torchrun each process owns the GPU of its local rank.
            local_rank = os.environ.get("LOCAL_RANK")
            index = torch.cuda.current_device() if local_rank is None else int(local_rank)
            resolved = torch.device("cuda", index)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} resolves to {resolved} but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible."
            )
        torch.cuda.set_device(resolved)  # collectives and "cuda" tensors follow it
    return resolved


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move the optimizer's per-parameter state tensors to ``device`` (steps stay put)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device != device and value.ndim > 0:
                state[key] = value.to(device)


def checked_loss(loss: Any) -> torch.Tensor:
    """Return ``loss`` if it is a scalar tensor, else raise a ``ConfigError`` saying so."""
    if isinstance(loss, torch.Tensor) and loss.ndim == 0:
        return loss
    described = (
        f"a tensor of shape {tuple(loss.shape)}"
        if isinstance(loss, torch.Tensor)
        else f"a {type(loss).__name__}"
    )
    raise ConfigError(
        f"loss_fn must return a scalar tensor; it returned {described}. Reduce it "
        "(for example reduction='mean') or override Step.loss."
    )

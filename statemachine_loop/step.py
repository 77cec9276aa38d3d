"""How one batch becomes an input, a target, an output and a loss.

The default :class:`Step` takes batches that are ``(input, target)`` pairs, calls
``model(input)`` and ``loss_fn(output, target)``. For anything else — dict batches,
several inputs, a model that returns a tuple — subclass it and override the method
that differs; this is the counterpart of the original ``TrainingLoop``'s
``differentiableStep``, split so the lifecycle events can still fire between its parts
(``batch_start`` before :meth:`Step.forward`, ``update_start`` after the backward pass,
``inference_prediction_end`` between :meth:`Step.forward` and :meth:`Step.loss`).

Example, for batches that are dicts::

    class DictStep(Step):
        def split(self, batch):
            return batch["features"], batch["label"]

    loop = TrainingLoop(training=loader, optimizer=opt, loss_fn=F.cross_entropy,
                        step=DictStep())
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from statemachine_loop.errors import ConfigError

__all__ = ["BoundStep", "LossFn", "Step", "bind_step", "move_to_device"]

#: A loss function ``loss_fn(output, target) -> scalar tensor``.
LossFn = Callable[[Any, Any], torch.Tensor]


class Step:
    """The per-batch work of the loop, in overridable parts.

    Methods are called for every batch; keep overrides cheap. ``split`` may raise
    :class:`ConfigError` for a batch it does not understand.
    """

    def split(self, batch: Any) -> tuple[Any, Any]:
        """Split a batch into ``(input, target)``; the default expects a 2-item sequence."""
        kind = type(batch)
        if (kind is list or kind is tuple) and len(batch) == 2:  # what DataLoader yields
            return batch[0], batch[1]
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
            return batch[0], batch[1]
        raise ConfigError(
            f"The default step expects each batch to be an (input, target) pair; got "
            f"{_describe(batch)}. Pass step=... with a Step subclass whose split() "
            "returns (input, target) for your batches."
        )

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        """Run the model on the input; the default is ``model(inputs)``."""
        return model(inputs)

    def loss(self, loss_fn: LossFn, output: Any, target: Any) -> torch.Tensor:
        """Compute the batch's scalar loss; the default is ``loss_fn(output, target)``."""
        return loss_fn(output, target)

    def batch_size(self, inputs: Any, target: Any) -> int:
        """How many samples the batch holds, to weight its loss: the target's first dimension."""
        if type(target) is torch.Tensor and target.ndim:
            return target.shape[0]
        if isinstance(target, torch.Tensor) and target.ndim > 0:
            return int(target.shape[0])
        if isinstance(target, Sequence):
            return len(target)
        if isinstance(inputs, torch.Tensor) and inputs.ndim > 0:
            return int(inputs.shape[0])
        return 1


@attrs.frozen
class BoundStep:
    """A :class:`Step`'s per-batch calls, resolved once per fit.

    Where the step keeps the default ``forward`` or ``loss``, the call is the one that
    default makes (``model(inputs)``, ``loss_fn(output, target)``) instead of the method
    around it: the same result, one Python frame less for every batch.
    """

    split: Callable[[Any], tuple[Any, Any]]
    forward: Callable[[torch.nn.Module, Any], Any]
    loss: Callable[[LossFn, Any, Any], Any]
    batch_size: Callable[[Any, Any], int]


def bind_step(step: Step) -> BoundStep:
    """The calls a fit makes for ``step`` on every batch (see :class:`BoundStep`)."""
    kind = type(step)
    return BoundStep(
        split=step.split,
        forward=operator.call if kind.forward is Step.forward else step.forward,
        loss=operator.call if kind.loss is Step.loss else step.loss,
        batch_size=step.batch_size,
    )


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, torch.Tensor):
        return f"a single tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"


def move_to_device(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        rebuild: Any = type(batch)
        return rebuild(
            {key: move_to_device(value, device, non_blocking) for key, value in batch.items()}
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device, non_blocking) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(value, device, non_blocking) for value in batch)
    return batch


def needs_move(batch: Any, device: torch.device) -> bool:
    """Whether any tensor in a (nested) batch is not already on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.device != device
    if isinstance(batch, list | tuple):  # before Mapping, whose isinstance check is slower
        return any(needs_move(value, device) for value in batch)
    if isinstance(batch, Mapping):
        return any(needs_move(value, device) for value in batch.values())
    return False

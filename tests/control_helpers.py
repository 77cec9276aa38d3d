"""Small data sets, models, loops and probes for the training-control callback tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Callback, TrainingLoop
from statemachine_loop.decisions import DecisionRecord

FEATURES = 3


def regression(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> TensorDataset:
    """``n`` samples of a noisy linear target, so a linear model can fit it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=dtype)
    w = torch.tensor([[1.5], [-2.0], [0.5]], dtype=dtype)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
    return TensorDataset(x, y)


def batches(n: int, batch_size: int, *, seed: int = 0, **kwargs: Any) -> DataLoader[Any]:
    """An unshuffled loader over :func:`regression` data."""
    return DataLoader(regression(n, seed=seed, **kwargs), batch_size=batch_size)


def regrouped(data: DataLoader[Any], sizes: Sequence[int]) -> list[tuple[torch.Tensor, ...]]:
    """The same samples as ``data``, in batches of the given sizes (a list of batches)."""
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    assert sum(sizes) == len(x)
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


class Unsized:
    """An iterable of batches with no ``len()`` (like an IterableDataset's loader)."""

    def __init__(self, data: Sequence[Any]) -> None:
        self._data = list(data)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)


def model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Linear:
    """A fresh linear model with seeded weights."""
    torch.manual_seed(seed)
    return torch.nn.Linear(FEATURES, 1).to(dtype)


def make_loop(
    net: torch.nn.Module,
    training: Any,
    *,
    validation: Any = None,
    callbacks: Sequence[Any] = (),
    lr: float = 0.05,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    loss_fn: Any = torch.nn.functional.mse_loss,
    engine: str = "compiled",
    **options: Any,
) -> TrainingLoop:
    """A loop with MSE loss and SGD (or ``optimizer``) over ``net``'s parameters."""
    return TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer(net.parameters(), lr=lr, **options),
        loss_fn=loss_fn,
        callbacks=callbacks,
        engine=engine,  # type: ignore[arg-type]
    )


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of the parameters."""
    return [p.detach().clone() for p in net.parameters()]


def decisions(loop: TrainingLoop, callback: str) -> list[DecisionRecord]:
    """The decisions one callback took in the latest fit."""
    return [record for record in loop.decisions if record.callback == callback]


class Probe(Callback):
    """Records, per taken update, the learning rate and a copy of the gradients."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.grads: list[list[torch.Tensor]] = []
        self.updates: list[tuple[int, int]] = []
        self.train_losses: list[float] = []

    def on_update_start(self, loop: TrainingLoop) -> None:
        """Record the update about to be taken."""
        self.lrs.append(float(loop.optimizer.param_groups[0]["lr"]))
        assert loop.model is not None
        self.grads.append(
            [p.grad.detach().clone() for p in loop.model.parameters() if p.grad is not None]
        )
        self.updates.append((loop.epoch_index, loop.batch_index))

    def on_training_end(self, loop: TrainingLoop) -> None:
        """Record the phase's loss."""
        self.train_losses.append(loop.metrics["loss"])

"""The tiny fit the logger tests share: a small MLP that can fail on cue, on fixed batches."""

from __future__ import annotations

from typing import Any

import torch

from statemachine_loop import TrainingLoop


class Net(torch.nn.Module):
    """A small MLP that raises from its forward pass at call number ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        )
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"forward failed at call {self.calls}")
        out: torch.Tensor = self.body(x)
        return out


def make_loop(
    callbacks: list[Any],
    *,
    train: int = 6,
    valid: int = 3,
    fail_at: int | None = None,
    metrics: list[Any] | None = None,
) -> tuple[TrainingLoop, Net]:
    """A loop over ``train`` and ``valid`` fixed batches of 4 (no validation when 0)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((train + valid) * 4, 4, generator=generator)
    y = (x.sum(1, keepdim=True) > 0).float()
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(x), 4)]
    torch.manual_seed(0)
    model = Net(fail_at)
    loop = TrainingLoop(
        training=batches[:train],
        validation=batches[train:] or None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.binary_cross_entropy_with_logits,
        metrics=["accuracy"] if metrics is None else metrics,
        callbacks=callbacks,
    )
    return loop, model

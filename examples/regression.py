"""Regression with the tutorial's ``SimpleNN``, written with the loop.

Mirrors the classic first PyTorch training loop: a ``SimpleNN`` (``Linear(10, 50)``,
ReLU, ``Linear(50, 1)``) trained with mean squared error and plain SGD on random
inputs. The hand-written ``for epoch ...: for x, y in loader: ...`` becomes one
``TrainingLoop``; the per-epoch ``print`` becomes a plain-function observer
``fn(loop, event)``, the way the original ``TrainingLoop`` took callbacks.

The targets are not pure noise, so there is something to learn: they are the outputs
of a fixed random "teacher" network of the same shape, plus a little noise, scaled to
unit variance. Predicting the mean therefore scores an MSE of about 1.0, and the
student should get close to the noise floor (0.01)::

    python examples/regression.py           # 10 epochs, about ten seconds
    python examples/regression.py --smoke   # 1 epoch on a few hundred samples
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Event, TrainingLoop

NOISE = 0.1  # standard deviation of the target noise, after scaling to unit variance


class SimpleNN(nn.Module):
    """The tutorial's model: 10 inputs, one hidden layer of 50 ReLU units, 1 output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 50)
        self.fc2 = nn.Linear(50, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prediction: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return prediction


def make_data(samples: int, generator: torch.Generator) -> TensorDataset:
    """Random inputs; targets from a fixed random teacher ``SimpleNN`` plus noise."""
    teacher = SimpleNN()
    for parameter in teacher.parameters():  # a teacher with a less flat response
        nn.init.normal_(parameter, std=1.0, generator=generator)
    inputs = torch.randn(samples, 10, generator=generator)
    with torch.no_grad():
        clean = teacher(inputs)
    clean = (clean - clean.mean()) / clean.std()
    targets = clean + NOISE * torch.randn(samples, 1, generator=generator)
    return TensorDataset(inputs, targets)


def print_epoch(loop: TrainingLoop, event: Event) -> None:
    """A plain-function observer: print both phases' loss when an epoch ends."""
    if event is Event.EPOCH_END and loop.history.validation:
        training, validation = loop.history.training[-1], loop.history.validation[-1]
        print(
            f"epoch {loop.epoch_index + 1}/{loop.epoch_count}  "
            f"training mse {training['loss']:.4f}  validation mse {validation['loss']:.4f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (1 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train ``SimpleNN`` and return its final validation MSE."""
    args = parse_args(argv)
    epochs = args.epochs or (1 if args.smoke else 10)
    samples = 512 if args.smoke else 5000
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = make_data(samples, generator)
    cut = samples * 4 // 5
    train, valid = data[:cut], data[cut:]
    training = DataLoader(TensorDataset(*train), batch_size=32, shuffle=True, generator=generator)
    validation = DataLoader(TensorDataset(*valid), batch_size=256)

    model = SimpleNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.mse_loss,  # the "loss" metric is then the MSE
        callbacks=[print_epoch],
    )
    print(f"SimpleNN on {cut} random samples, validating on {samples - cut}.")
    history = loop.fit(model, epochs=epochs)
    mse = history.validation[-1]["loss"]
    print(
        f"final validation mse {mse:.4f} (predicting the mean: about 1.0; "
        f"noise floor: {NOISE**2:.2f}); R^2 {1 - mse:.3f}"
    )
    return mse


if __name__ == "__main__":
    main()

"""LeNet on scikit-learn's bundled digits, logged to CSV.

Mirrors the original LeNet-MNIST example of Swift for TensorFlow's ``TrainingLoop``:
the same LeNet-5 (5x5 convolutions with 6 and 16 filters, average pooling, dense
layers of 120, 84 and 10 units, ReLU), SGD (here with momentum), cross-entropy and
accuracy, with the per-batch statistics written by
:class:`~statemachine_loop.callbacks.csv_logger.CSVLogger`.

MNIST is not downloaded: scikit-learn ships 1,797 real 8x8 handwritten digits, which
are upsampled once to MNIST's 28x28 so the network keeps LeNet's shapes (28 -> 14 ->
10 -> 5, then 16 x 5 x 5 = 400 features into the dense layers). The CSV holds one row
per batch; the last row of each phase also holds the phase's final accuracy, so
``pandas.read_csv(path).dropna(subset=["accuracy"])`` is one row per phase::

    python examples/lenet_digits.py           # 8 epochs, writes run/lenet_digits/log.csv
    python examples/lenet_digits.py --smoke   # 1 epoch on a few hundred digits
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import TrainingLoop
from statemachine_loop.callbacks.csv_logger import CSVLogger


class LeNet(nn.Module):
    """LeNet-5 as in the original example, for 1x28x28 inputs and 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),  # "same" padding: 28x28
            nn.ReLU(),
            nn.AvgPool2d(2),  # 14x14
            nn.Conv2d(6, 16, kernel_size=5),  # 10x10
            nn.ReLU(),
            nn.AvgPool2d(2),  # 5x5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


def load_images(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(N, 1, size, size)`` images in [0, 1] and their labels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


def phase_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's phase-summary rows: the last row of each phase carries its accuracy.

    (Its ``loss`` cell is that last batch's loss; the phase's mean loss is in ``History``.)
    """
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if row["accuracy"]]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None, help="default 8 (1 with --smoke)")
    parser.add_argument("--out", type=Path, default=None, help="default run/lenet_digits")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train LeNet, write the CSV log, and return the final validation accuracy."""
    args = parse_args(argv)
    epochs = args.epochs or (1 if args.smoke else 8)
    out = args.out or Path("run/smoke/lenet_digits" if args.smoke else "run/lenet_digits")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_images()
    order = torch.randperm(len(images), generator=generator)
    if args.smoke:
        order = order[:384]
    cut = len(order) * 4 // 5
    train_idx, valid_idx = order[:cut], order[cut:]
    training = DataLoader(
        TensorDataset(images[train_idx], labels[train_idx]),
        batch_size=32,
        shuffle=True,
        generator=generator,
    )
    validation = DataLoader(TensorDataset(images[valid_idx], labels[valid_idx]), batch_size=256)

    model = LeNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    csv_path = out / "log.csv"
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        metrics=["accuracy"],
        callbacks=[CSVLogger(csv_path)],
    )
    print(f"LeNet on {len(train_idx)} digits upsampled to 28x28, validating on {len(valid_idx)}.")
    history = loop.fit(model, epochs=epochs)
    for row in phase_rows(csv_path):
        epoch, accuracy = int(row["epoch"]) + 1, float(row["accuracy"])
        print(f"epoch {epoch:>2} {row['phase']:<10}  accuracy {accuracy:.4f}")
    with csv_path.open() as file:
        rows = sum(1 for _ in file) - 1
    accuracy = history.validation[-1]["accuracy"]
    print(f"wrote {rows} rows (one per batch of both phases) to {csv_path}")
    print(f"final validation accuracy {accuracy:.4f} after {len(history.training)} epochs")
    return accuracy


if __name__ == "__main__":
    main()

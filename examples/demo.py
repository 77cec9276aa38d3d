"""The main job: train an MLP on scikit-learn's bundled handwritten digits.

1,797 real 8x8 digits ship with scikit-learn, so nothing is downloaded. The run
prints one line of metrics per epoch through a plain-function observer, the way the
original ``TrainingLoop`` was used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Event, TrainingLoop


def print_epoch(loop: TrainingLoop, event: Event) -> None:
    """Print the training and validation metrics of each finished epoch."""
    if event is not Event.EPOCH_END:
        return
    training = loop.history.training[-1] if loop.history.training else {}
    validation = loop.history.validation[-1] if loop.history.validation else {}
    print(
        f"epoch {loop.epoch_index + 1}/{loop.epoch_count}  "
        f"loss {training.get('loss', float('nan')):.4f}  "
        f"accuracy {training.get('accuracy', float('nan')):.4f}  |  "
        f"validation loss {validation.get('loss', float('nan')):.4f}  "
        f"accuracy {validation.get('accuracy', float('nan')):.4f}  "
        f"top5 {validation.get('top5_accuracy', float('nan')):.4f}"
    )


def main() -> None:
    """Train for a few epochs and print per-epoch metrics."""
    torch.manual_seed(0)
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    train_idx, valid_idx = order[:1437], order[1437:]
    training = DataLoader(
        TensorDataset(inputs[train_idx], targets[train_idx]),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    validation = DataLoader(TensorDataset(inputs[valid_idx], targets[valid_idx]), batch_size=256)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        metrics=["accuracy", "top5_accuracy"],
        callbacks=[print_epoch],
    )
    print(f"Training an MLP on {len(train_idx)} digits, validating on {len(valid_idx)}.")
    history = loop.fit(model, epochs=8, device="cpu")
    final = history.validation[-1]
    print(
        f"Final validation accuracy: {final['accuracy']:.2%} after {len(history.training)} epochs."
    )


if __name__ == "__main__":
    main()

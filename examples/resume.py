"""Preempted mid-epoch, resumed with ``resume="auto"``, and bit-for-bit the same result.

Trains an MLP with dropout on scikit-learn's bundled digits (nothing is downloaded)
three times:

1. straight through, for reference;
2. with ``Checkpoint(every_n_batches=...)``, and an observer that sends this very
   process ``SIGTERM`` in the middle of an epoch, as a cluster does when it preempts a
   job: the loop checkpoints at the next batch boundary and stops with
   ``stop_reason="preempted"``, after a normal wind-down;
3. a fresh model, optimizer and data loaders, ``fit(..., resume="auto")``: it picks the
   newest valid checkpoint and carries on where run 2 stopped,

and checks that runs 1 and 3 end with bit-for-bit equal parameters::

    python examples/resume.py            # 6 epochs
    python examples/resume.py --smoke    # 2 epochs, a few seconds
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Event, TrainingLoop
from statemachine_loop.callbacks.checkpoint import Checkpoint


def make_run(callbacks: list[object]) -> tuple[TrainingLoop, torch.nn.Module]:
    """Model, optimizer, data and loop, built the same way every time."""
    torch.manual_seed(0)  # the initial weights (a resumed run loads its own)
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    training = DataLoader(
        TensorDataset(inputs[:1400], targets[:1400]),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),  # the data order is part of the run
    )
    validation = DataLoader(TensorDataset(inputs[1400:], targets[1400:]), batch_size=256)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 10)
    )
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        loss_fn=F.cross_entropy,
        metrics=["accuracy"],
        callbacks=callbacks,  # type: ignore[arg-type]
    )
    return loop, model


def preempt_at(epoch: int, batch: int) -> object:
    """An observer that sends this process SIGTERM after one training batch."""

    def observe(loop: TrainingLoop, event: Event) -> None:
        here = (loop.epoch_index, loop.batch_index) == (epoch, batch)
        if event is Event.BATCH_END and loop.is_training and here:
            print(f"  sending SIGTERM to myself after epoch {epoch}, batch {batch}")
            os.kill(os.getpid(), signal.SIGTERM)

    return observe


def main(argv: list[str] | None = None) -> int:
    """Run the three fits; 0 if the resumed result equals the uninterrupted one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 epochs: a few seconds")
    parser.add_argument("--directory", type=Path, help="keep the checkpoints here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = 2 if args.smoke else 6
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.directory or Path(scratch) / "checkpoints"

        print(f"1. Uninterrupted: {epochs} epochs.")
        loop, straight = make_run([])
        history = loop.fit(straight, epochs)
        print(f"  validation accuracy {history.validation[-1]['accuracy']:.4f}")

        print(f"2. Checkpointing every 10 batches into {directory}, preempted mid-epoch.")
        checkpoint = Checkpoint(directory, every_n_batches=10)
        loop, model = make_run([checkpoint, preempt_at(epoch=epochs - 1, batch=20)])
        loop.fit(model, epochs, resume="auto")
        newest = checkpoint.saved[-1]
        print(f"  stopped: {loop.stop_reason}; newest checkpoint {newest.path.name}")

        print('3. A fresh process would now do the same: fit(..., resume="auto").')
        loop, resumed = make_run([Checkpoint(directory, every_n_batches=10)])
        history = loop.fit(resumed, epochs, resume="auto")
        print(f"  resumed from {Path(loop.resumed_from or '-').name}")
        print(f"  validation accuracy {history.validation[-1]['accuracy']:.4f}")

    equal = all(map(torch.equal, straight.parameters(), resumed.parameters()))
    print(f"Resumed result equal to the uninterrupted run, bit for bit: {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())

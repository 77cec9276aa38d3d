"""The main job (``make demo``): the tutorial's MNIST exercise on scikit-learn's digits.

An MLP with one hidden layer, cross-entropy and Adam, as in the original tutorial,
trained on the 1,797 real 8x8 handwritten digits that ship with scikit-learn (nothing
is downloaded), with everything the library offers switched on:

* a progress bar (animated on a terminal, one line per phase elsewhere);
* a warmup-then-linear-decay learning-rate schedule (``LearningRateScheduler``);
* early stopping on the validation loss, restoring the best weights;
* checkpoints every epoch (``fit(resume="auto")`` would continue from them);
* CSV, TensorBoard and structured (JSON lines) logs under ``run/``.

It prints where everything went and the commands to look at it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Schedule, Segment, TrainingLoop
from statemachine_loop.callbacks import (
    Checkpoint,
    CSVLogger,
    EarlyStopping,
    LearningRateScheduler,
    StructuredLogger,
    TensorBoardLogger,
)


def main(argv: list[str] | None = None) -> float:
    """Train, print where the outputs are, and return the final validation accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("run"), help="where outputs go")
    parser.add_argument("--epochs", type=int, default=30, help="at most this many epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a small model: one thread is faster than two here
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
    warmup = len(training)  # one epoch of linear warmup, then linear decay to zero
    schedule = Schedule(
        [Segment("linear", start=0.0, end=3e-3, steps=warmup), Segment("linear", end=0.0)]
    )

    out = args.out
    tensorboard = TensorBoardLogger(out / "tensorboard" / "stats")
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        metrics=["accuracy", "top5_accuracy"],
        callbacks=[
            LearningRateScheduler(schedule),
            EarlyStopping(monitor="validation/loss", patience=3),
            CSVLogger(out / "log.csv"),
            tensorboard,
            StructuredLogger(out / "events.jsonl"),
            Checkpoint(out / "checkpoints", keep_last=2),
        ],
    )
    print(f"Training an MLP on {len(train_idx)} digits, validating on {len(valid_idx)}.")
    started = time.perf_counter()
    history = loop.fit(model, epochs=args.epochs)
    seconds = time.perf_counter() - started
    best = min(history.validation, key=lambda entry: entry["loss"])
    print()
    print(
        f"Trained {len(history.training)} epochs in {seconds:.1f} s"
        + (f"; stopped: {loop.stop_reason}" if loop.stop_reason else ".")
    )
    print(
        f"Best validation loss {best['loss']:.4f} at epoch {int(best['epoch']) + 1}, "
        f"validation accuracy {best['accuracy']:.2%}: its weights are restored."
    )
    print()
    print("Outputs:")
    print(f"  CSV, one row per batch:   {out / 'log.csv'}")
    print(f"  TensorBoard run:          {tensorboard.run_dir}")
    print(f"  structured log (JSONL):   {out / 'events.jsonl'}")
    print(f"  checkpoints:              {out / 'checkpoints'}")
    print()
    print("Look at them with:")
    print(f"  .venv/bin/smloop logs summary {out}")
    print(f"  .venv/bin/smloop logs validate {out}")
    print(f"  .venv/bin/tensorboard --logdir {out / 'tensorboard' / 'stats'}")
    return best["accuracy"]


if __name__ == "__main__":
    main()

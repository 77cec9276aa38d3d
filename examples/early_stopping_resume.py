"""Early stopping that survives a crash: ``EarlyStopping`` + ``Checkpoint`` + ``resume="auto"``.

Early stopping keeps state across epochs — the best validation loss so far, the epoch
it came from, how many epochs have passed without improving, and the best weights. A
job that crashes and restarts from scratch loses all of it: it would wait a full
``patience`` again, or stop against the wrong best. Here that state is part of every
checkpoint (``EarlyStopping.state_dict``), so a restarted job goes on counting.

The script trains an MLP on a small part of scikit-learn's bundled digits, so that it
overfits and early stopping has something to do, in two runs:

1. ``EarlyStopping(patience=3)`` and ``Checkpoint`` (one per epoch); a test callback
   raises in the middle of the first epoch that follows an epoch without improvement,
   as a crash would. The loop closes every open scope and re-raises the exception;
2. a *fresh* model, optimizer, ``EarlyStopping`` and ``Checkpoint`` over the same
   directory, and ``fit(..., resume="auto")``: the newest valid checkpoint is loaded,
   the early-stopping state comes back with it (printed when the first resumed epoch
   starts, and compared with the state at the crash), and training goes on until
   early stopping ends it and puts the best weights back;
3. the same job started once more, as a scheduler that restarts every exit would. The
   newest checkpoint is the one the stopping epoch wrote, with the whole patience
   already waited, so the resumed fit trains a single epoch and early stopping ends it
   again, instead of training ``patience`` more epochs against a forgotten best.

This mirrors the original docs' early-stopping recipe, and the resume story of
``examples/resume.py`` (which is about bit-for-bit exact resume after a preemption)::

    python examples/early_stopping_resume.py           # up to 40 epochs
    python examples/early_stopping_resume.py --smoke   # tiny data, a few short epochs
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Callback, TrainingLoop
from statemachine_loop.callbacks.checkpoint import Checkpoint
from statemachine_loop.callbacks.early_stopping import EarlyStopping


class SimulatedCrashError(RuntimeError):
    """What the crashing callback raises."""


class CrashWhileWaiting(Callback):
    """Raise at the third training batch of the first epoch that starts with ``wait >= 1``.

    Also crashes at ``fallback_epoch`` if the stopper never waits by then, so the
    example always demonstrates a resume.
    """

    def __init__(self, stopper: EarlyStopping, fallback_epoch: int) -> None:
        self.stopper = stopper
        self.fallback_epoch = fallback_epoch

    def on_batch_start(self, loop: TrainingLoop) -> None:
        waiting = self.stopper.wait >= 1 or loop.epoch_index >= self.fallback_epoch
        if loop.is_training and loop.batch_index == 2 and waiting:
            raise SimulatedCrashError(f"simulated crash at epoch {loop.epoch_index}, batch 2")


class PrintEpoch(Callback):
    """After each epoch: the validation loss, and where early stopping stands."""

    def __init__(self, stopper: EarlyStopping) -> None:
        self.stopper = stopper

    def on_epoch_end(self, loop: TrainingLoop) -> None:
        if loop.history.validation and loop.history.validation[-1]["epoch"] == loop.epoch_index:
            loss = loop.history.validation[-1]["loss"]
            print(
                f"  epoch {loop.epoch_index:>2}  validation loss {loss:.4f}  {state(self.stopper)}"
            )


class PrintResumedState(Callback):
    """At the first epoch of a resumed fit, print the early-stopping state it came back with.

    (Not at ``fit_start``: callback state is restored right after the ``fit_start``
    observers run, so that their usual resets cannot undo it.)
    """

    def __init__(self, stopper: EarlyStopping) -> None:
        self.stopper = stopper
        self.seen: tuple[float | None, int | None, int] | None = None

    def on_epoch_start(self, loop: TrainingLoop) -> None:
        if self.seen is None and loop.resumed_from is not None:
            self.seen = (self.stopper.best, self.stopper.best_epoch, self.stopper.wait)
            print(f"resumed from {Path(loop.resumed_from).name} at epoch {loop.epoch_index}")
            print(f"  EarlyStopping came back with {state(self.stopper)}")


def state(stopper: EarlyStopping) -> str:
    """The stopper's counting state, for people."""
    best = "none" if stopper.best is None else f"{stopper.best:.4f}"
    return (
        f"best {best} (epoch {stopper.best_epoch}), "
        f"{stopper.wait} of patience {stopper.patience} waited"
    )


def make_run(
    loaders: tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]],
    patience: int,
    checkpoints: Path,
) -> tuple[TrainingLoop, torch.nn.Module, EarlyStopping, Checkpoint]:
    """A fresh model, optimizer, stopper and checkpointer over ``checkpoints``."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    stopper = EarlyStopping("validation/loss", mode="min", patience=patience, restore_best=True)
    checkpoint = Checkpoint(checkpoints, every_n_epochs=1, keep_last=2)
    training, validation = loaders
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        metrics=["accuracy"],
        callbacks=[stopper, PrintEpoch(stopper), checkpoint],
    )
    return loop, model, stopper, checkpoint


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few short epochs")
    parser.add_argument("--out", type=Path, default=None, help="default run/early_stopping")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Crash, resume, stop early; return the best validation loss."""
    args = parse_args(argv)
    epochs, patience, fallback = (4, 1, 2) if args.smoke else (40, 3, 20)
    out = args.out or Path("run/smoke/early_stopping" if args.smoke else "run/early_stopping")
    checkpoints = out / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)  # "auto" must not find an older run's
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(inputs), generator=generator)
    train_size, valid_size = (96, 128) if args.smoke else (300, 600)
    train_idx, valid_idx = order[:train_size], order[train_size : train_size + valid_size]
    loaders = (
        DataLoader(
            TensorDataset(inputs[train_idx], targets[train_idx]),
            batch_size=16,
            shuffle=True,
            generator=generator,
        ),
        DataLoader(TensorDataset(inputs[valid_idx], targets[valid_idx]), batch_size=256),
    )

    print(f"run 1: up to {epochs} epochs on {train_size} digits, checkpoints in {checkpoints}")
    loop, model, stopper, _ = make_run(loaders, patience, checkpoints)
    try:
        loop.fit(model, epochs=epochs, callbacks=[CrashWhileWaiting(stopper, fallback)])
    except SimulatedCrashError as crash:
        print(f"run 1 crashed: {crash} (the loop wound down to {loop.state!r} and re-raised)")
    at_crash = (stopper.best, stopper.best_epoch, stopper.wait)

    print("run 2: a fresh model, optimizer and callbacks; fit(..., resume='auto')")
    torch.manual_seed(args.seed + 1)  # different initial weights: the checkpoint's must win
    loop, model, stopper, _ = make_run(loaders, patience, checkpoints)
    shown = PrintResumedState(stopper)
    history = loop.fit(model, epochs=epochs, callbacks=[shown], resume="auto")
    survived = shown.seen == at_crash
    print(f"early-stopping state survived the crash: {'yes' if survived else 'NO'}")
    print(f"run 2 ended: {loop.stop_reason or f'all {epochs} epochs done'}")
    best_epoch = stopper.best_epoch
    best = next(e for e in history.validation if e["epoch"] == best_epoch)

    # A scheduler that restarts the job after any exit runs it again. The stopping epoch's
    # checkpoint holds the patience already spent, so one more epoch is all it trains.
    print("run 3: the same job started again; fit(..., resume='auto')")
    again, again_model, again_stopper, _ = make_run(loaders, patience, checkpoints)
    again.fit(
        again_model, epochs=epochs, callbacks=[PrintResumedState(again_stopper)], resume="auto"
    )
    print(f"run 3 ended: {again.stop_reason or f'all {epochs} epochs done'}")
    print(
        f"final best validation loss {best['loss']:.4f} at epoch {best_epoch} "
        f"(accuracy {best['accuracy']:.4f}; those weights are back in the model)"
    )
    return best["loss"]


if __name__ == "__main__":
    main()

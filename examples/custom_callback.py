"""Writing your own callbacks: an observer at ``update_start``, a veto and a redirect.

Mirrors the custom-callback example of the original ``TrainingLoop`` docs, which acted
at ``updateStart`` — after the backward pass, before the optimizer applies the
gradients — and adds the two other things a callback here can do:

* :class:`GradientNormLogger` *observes* ``update_start``: it reads the gradient norm
  of every update that actually happens, just before ``optimizer.step()``. It keeps the
  norms as tensors and reads them back once per epoch, so it never waits on the device
  per batch.
* :class:`SkipCorruptBatches` is a *guard* of ``batch_start`` that returns ``Veto``:
  a training batch holding a non-finite input is skipped before the forward pass (no
  loss, no update, no ``batch_end``). The script plants NaNs in two batches.
* :class:`LimitTrainingBatches` is a guard of ``batch_start`` that returns
  ``Redirect(Event.TRAINING_END, ...)`` once the phase has fetched ``limit`` batches:
  the training phase closes early and normally (its metrics cover the batches that
  ran), then validation runs as usual.

Every decision lands in ``loop.decisions`` with the callback's name and its reason;
the script prints them. The data is scikit-learn's bundled digits, classified by an
MLP::

    python examples/custom_callback.py           # 4 epochs
    python examples/custom_callback.py --smoke   # 1 epoch
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Callback, Event, Redirect, TrainingLoop, Veto


class GradientNormLogger(Callback):
    """Observe ``update_start``: the gradient norm of each update, before the step."""

    def __init__(self) -> None:
        self.norms: list[torch.Tensor] = []  # this epoch's, still on the device
        #: ``(epoch index, updates, mean norm, largest norm)`` per training phase.
        self.epochs: list[tuple[int, int, float, float]] = []

    def on_training_start(self, loop: TrainingLoop) -> None:
        self.norms = []

    def on_update_start(self, loop: TrainingLoop) -> None:
        # Called only for updates that happen (a vetoed update_start has no observers),
        # after backward and before optimizer.step(): the gradients about to be applied.
        gradients = [p.grad for p in loop.optimizer.param_groups[0]["params"] if p.grad is not None]
        self.norms.append(torch.nn.utils.get_total_norm(gradients))

    def on_training_end(self, loop: TrainingLoop) -> None:
        if self.norms:
            norms = torch.stack(self.norms)  # one read-back per epoch, not one per batch
            entry = (loop.epoch_index, len(self.norms), float(norms.mean()), float(norms.max()))
            self.epochs.append(entry)


class SkipCorruptBatches(Callback):
    """Guard ``batch_start``: veto a training batch whose input is not finite."""

    def guard_batch_start(self, loop: TrainingLoop) -> Veto | None:
        # The batch is already fetched, moved and split when batch_start is proposed.
        inputs = loop.last_step_input
        if loop.is_training and not bool(torch.isfinite(inputs).all()):
            bad = int((~torch.isfinite(inputs)).any(dim=1).sum())
            return Veto(f"{bad} of {len(inputs)} samples have non-finite inputs")
        return None


class LimitTrainingBatches(Callback):
    """Guard ``batch_start``: close the training phase after ``limit`` batches."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def guard_batch_start(self, loop: TrainingLoop) -> Redirect | None:
        if loop.is_training and loop.batch_index >= self.limit:
            return Redirect(Event.TRAINING_END, f"training limited to {self.limit} batches")
        return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None, help="default 4 (1 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train with the three callbacks, print their decisions; return validation accuracy."""
    args = parse_args(argv)
    epochs = args.epochs or (1 if args.smoke else 4)
    batch_size = 32
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(inputs), generator=generator)
    train_idx, valid_idx = order[:1437], order[1437:]
    if args.smoke:
        train_idx, valid_idx = train_idx[:320], valid_idx[:128]
    train_inputs = inputs[train_idx].clone()
    # Plant NaNs in a few samples of batches 2 and 5 (the order is fixed: shuffle=False).
    for batch in (2, 5):
        train_inputs[batch * batch_size : batch * batch_size + 3, 10] = float("nan")
    training = DataLoader(TensorDataset(train_inputs, targets[train_idx]), batch_size=batch_size)
    validation = DataLoader(TensorDataset(inputs[valid_idx], targets[valid_idx]), batch_size=256)
    limit = len(training) - 3

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    norms = GradientNormLogger()
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        metrics=["accuracy"],
        callbacks=[norms, SkipCorruptBatches(), LimitTrainingBatches(limit)],
    )
    print(f"{len(training)} training batches per epoch, NaNs planted in batches 2 and 5.")
    history = loop.fit(model, epochs=epochs)

    for epoch, updates, mean, largest in norms.epochs:
        print(
            f"epoch {epoch + 1}: {updates} updates, gradient norm before the step: "
            f"mean {mean:.3f}, largest {largest:.3f}"
        )
    print("loop.decisions:")
    for record in loop.decisions:
        target = f" -> {record.target.value}" if record.target is not None else ""
        print(
            f"  epoch {record.epoch_index} batch {record.batch_index:>2}  {record.callback}: "
            f"{record.kind.value} {record.event.value}{target} ({record.reason})"
        )
    kinds = Counter(record.kind.value for record in loop.decisions)
    accuracy = history.validation[-1]["accuracy"]
    print(
        f"final validation accuracy {accuracy:.4f}; decisions: veto {kinds['veto']}, "
        f"redirect {kinds['redirect']}"
    )
    return accuracy


if __name__ == "__main__":
    main()

"""Data-parallel training: the same script in one process or many, on CPUs or GPUs.

Trains an MLP on scikit-learn's bundled digits (nothing is downloaded) with
validation, ``EarlyStopping`` and ``Checkpoint``::

    python examples/ddp.py                            # one process
    torchrun --nproc_per_node 2 examples/ddp.py       # two processes here (gloo, CPU)
    python examples/ddp.py --smoke                    # 3 epochs: a few seconds

and on a GPU cluster, one process per GPU (nccl), every node running::

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $HEAD_NODE:29500 examples/ddp.py --device cuda

Nothing in the script is distributed code: ``fit`` sees the ``torchrun`` environment,
joins the process group, wraps the model in ``DistributedDataParallel`` and gives each
rank its shard of the data. Two things are the script's to decide: the batch size of a
``DataLoader`` is per process, so it divides the global batch by the world size to
train exactly as one process would; and under ``--device cuda`` each process takes the
GPU its ``LOCAL_RANK`` names (``torch.cuda.set_device`` and ``device="cuda:<N>"``).
Rank 0 prints the (global) metrics and writes the checkpoints; with ``--resume`` a
restarted job carries on from the newest one.

The training data is shuffled once, up front, and then read in a fixed order, so one
process and N processes see the same global batches and print the same accuracy.
``--shuffle`` reshuffles every epoch instead: then a single process draws its order
from ``RandomSampler`` and N processes from ``DistributedSampler``, two different (and
equally good) sequences of batches.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Callback, TrainingLoop
from statemachine_loop.callbacks import Checkpoint, EarlyStopping

#: Sizes divisible by any world size up to 32, so no rank reads a padded sample.
TRAIN_SAMPLES, VALIDATION_SAMPLES = 1440, 352


class PrintEpochs(Callback):
    """Rank 0 prints each epoch's metrics: the global values, the same on every rank."""

    may_stop = False  # never returns Stop: its observer costs no collective

    def on_epoch_end(self, loop: TrainingLoop) -> None:
        if not loop.is_main_process or not loop.history.validation:
            return
        training, validation = loop.history.training[-1], loop.history.validation[-1]
        print(
            f"epoch {loop.epoch_index + 1:3d}/{loop.epoch_count}  "
            f"loss {training['loss']:.4f}  accuracy {training['accuracy']:.4f}  |  "
            f"validation loss {validation['loss']:.4f}  accuracy {validation['accuracy']:.4f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="global, over all ranks")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("run/ddp"), help="checkpoints go here")
    parser.add_argument("--shuffle", action="store_true", help="reshuffle every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    parser.add_argument("--smoke", action="store_true", help="3 epochs: a few seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    # Set by torchrun; absent when this runs as a single process.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_size % world_size:
        parser.error(f"--batch-size {args.batch_size} must divide by {world_size} processes")
    device = "cpu"
    if args.device == "cuda":
        # One GPU per process. set_device too: NCCL's object collectives (the loop
        # gathers decisions and metric states with them) use the *current* device.
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    inputs = torch.tensor(digits.data, dtype=torch.float32)[order] / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)[order]
    train, held_out = (
        slice(0, TRAIN_SAMPLES),
        slice(TRAIN_SAMPLES, TRAIN_SAMPLES + VALIDATION_SAMPLES),
    )
    training = DataLoader(
        TensorDataset(inputs[train], targets[train]),
        batch_size=args.batch_size // world_size,  # per process
        shuffle=args.shuffle,
    )
    validation = DataLoader(
        TensorDataset(inputs[held_out], targets[held_out]),
        batch_size=256,
    )

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    early_stopping = EarlyStopping("validation/loss", patience=3)
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=F.cross_entropy,
        metrics=["accuracy"],
        callbacks=[
            PrintEpochs(),
            early_stopping,
            Checkpoint(args.out / "checkpoints", monitor="validation/accuracy", mode="max"),
        ],
    )
    epochs = 3 if args.smoke else args.epochs
    history = loop.fit(model, epochs, device=device, resume="auto" if args.resume else None)

    if loop.is_main_process:
        if loop.resumed_from:
            print(f"resumed from {loop.resumed_from}")
        if loop.stop_reason:
            print(f"stopped early: {loop.stop_reason}")
        print(f"processes: {loop.world_size}, batch per process: {training.batch_size}")
        if early_stopping.best is not None and early_stopping.best_epoch is not None:
            best, best_epoch = early_stopping.best, early_stopping.best_epoch + 1
            print(f"best validation loss {best:.4f}, at epoch {best_epoch} (its weights are kept)")
        print(f"final validation accuracy: {history.validation[-1]['accuracy']:.4f}")
    if dist.is_initialized():
        # Tear the group down only once every rank is done with it, and once nothing
        # holds it any more: the loop keeps the DistributedDataParallel wrapper, whose
        # reducer holds the group, so it goes first (the loop's reference cycles need
        # a collection). A group left for the interpreter's exit to destroy made a rank
        # abort there ("terminate called without an active exception") in one run in
        # eight of this script on two gloo ranks; none in seventy this way.
        dist.barrier()
        del loop
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One rank of ``test_distributed.py``: named scenarios run in one process group.

``python tests/ddp_worker.py OUT SCENARIO [SCENARIO ...]`` is started once per rank
with the ``torchrun`` environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``). The first ``fit`` initialises the gloo group from
that environment, as it would under ``torchrun``; every later scenario reuses it, so
one launch of two processes (seconds each, on a loaded machine) serves them all.

Each scenario's result, or the exception it raised, is written to
``OUT/<scenario>.rank<r>.pt`` as soon as it finishes, so a hang in one scenario still
leaves the results of the earlier ones for the test to report. The test also imports
this module for the single-process reference runs (``world=1``), which build the same
data, model and optimizer; the per-rank batch is the global batch divided by the world
size, so both see the same global batches.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Callback, Event, LoopError, Redirect, Stop, TrainingLoop, Veto
from statemachine_loop.callbacks import Checkpoint
from statemachine_loop.checkpoint_io import list_checkpoints
from statemachine_loop.testing import TraceRecorder

TRAIN_SAMPLES = 64
VALIDATION_SAMPLES = 32
GLOBAL_BATCH = 16  # 4 training batches per epoch, whatever the world size
GLOBAL_VALIDATION_BATCH = 16  # 2 validation batches per epoch
FEATURES, CLASSES = 5, 3


# -- the run every scenario builds ---------------------------------------------------


def make_loop(
    world: int,
    callbacks: Sequence[object] = (),
    *,
    shuffle: bool = False,
    dropout: bool = False,
    adam: bool = False,
) -> tuple[TrainingLoop, torch.nn.Module]:
    """Data, model, optimizer and loop, built identically on every rank and every call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TRAIN_SAMPLES + VALIDATION_SAMPLES, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (TRAIN_SAMPLES + VALIDATION_SAMPLES,), generator=g)
    training = DataLoader(
        TensorDataset(x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES]),
        batch_size=GLOBAL_BATCH // world,
        shuffle=shuffle,
    )
    validation = DataLoader(
        TensorDataset(x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:]),
        batch_size=GLOBAL_VALIDATION_BATCH // world,
    )
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, 8), torch.nn.ReLU()]
    if dropout:
        layers.append(torch.nn.Dropout(0.25))
    model = torch.nn.Sequential(*layers, torch.nn.Linear(8, CLASSES))
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.01)
        if adam
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        metrics=["accuracy"],
        callbacks=callbacks,  # type: ignore[arg-type]
    )
    # Ranks draw different dropout masks, so a resume that restored one rank's
    # random state on the other would not be bit-exact.
    torch.manual_seed(100 + int(os.environ.get("RANK", "0")))
    return loop, model


def summary(
    loop: TrainingLoop, model: torch.nn.Module, recorder: TraceRecorder | None
) -> dict[str, Any]:
    """What the test compares: parameters, History, trace, decisions, stop reason."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [dict(entry) for entry in loop.history.training],
        "validation": [dict(entry) for entry in loop.history.validation],
        "trace": None
        if recorder is None
        else [
            (e.event.value, e.state, e.epoch_index, e.batch_index, e.is_training, e.stop_reason)
            for e in recorder.entries
        ],
        "decisions": [d.as_dict() for d in loop.decisions],
        "stop_reason": loop.stop_reason,
        "rank": loop.rank,
        "world_size": loop.world_size,
        "is_main_process": loop.is_main_process,
        "resumed_from": loop.resumed_from,
    }


def baseline(world: int) -> dict[str, Any]:
    """Three plain epochs with validation; also the single-process reference."""
    recorder = TraceRecorder()
    loop, model = make_loop(world, [recorder])
    loop.fit(model, epochs=3)
    return summary(loop, model, recorder)


# -- callbacks that decide on rank 1 only ---------------------------------------------


class StopAtEpochEndOnRank1(Callback):
    """An observer ``Stop`` at the end of epoch 1, on rank 1 only (EarlyStopping's shape)."""

    def on_epoch_end(self, loop: TrainingLoop) -> Stop | None:
        if loop.rank == 1 and loop.epoch_index == 1:
            return Stop("rank 1 says stop")
        return None


class GuardBatchStartOnRank1(Callback):
    """A guard of ``batch_start`` that returns ``decision`` on rank 1 only, once."""

    def __init__(self, decision: Stop | Veto, epoch: int, batch: int) -> None:
        self.decision, self.epoch, self.batch = decision, epoch, batch

    def guard_batch_start(self, loop: TrainingLoop) -> Stop | Veto | None:
        here = (loop.epoch_index, loop.batch_index) == (self.epoch, self.batch)
        return self.decision if loop.rank == 1 and loop.is_training and here else None


class RedirectTrainingStart(Callback):
    """Redirects ``training_start`` to a different event on each rank."""

    def guard_training_start(self, loop: TrainingLoop) -> Redirect:
        target = Event.VALIDATION_START if loop.rank == 0 else Event.EPOCH_END
        return Redirect(target, f"rank {loop.rank} wants {target.value}")


class SigtermOnRank1(Callback):
    """Sends this process SIGTERM after training batch 1 of epoch 1, on rank 1 only."""

    may_stop = False

    def on_batch_end(self, loop: TrainingLoop) -> None:
        here = (loop.epoch_index, loop.batch_index) == (1, 1)
        if loop.rank == 1 and loop.is_training and here:
            os.kill(os.getpid(), signal.SIGTERM)


def stopped_run(callback: Callback, epochs: int) -> dict[str, Any]:
    recorder = TraceRecorder()
    loop, model = make_loop(2, [callback, recorder])
    loop.fit(model, epochs=epochs)
    return summary(loop, model, recorder)


# -- scenarios -----------------------------------------------------------------------


def _observer_stop(out: Path, rank: int) -> dict[str, Any]:
    return stopped_run(StopAtEpochEndOnRank1(), epochs=4)


def _guard_stop(out: Path, rank: int) -> dict[str, Any]:
    return stopped_run(GuardBatchStartOnRank1(Stop(), epoch=1, batch=2), epochs=4)


def _guard_veto(out: Path, rank: int) -> dict[str, Any]:
    return stopped_run(GuardBatchStartOnRank1(Veto("rank 1 skips"), epoch=0, batch=1), epochs=2)


def _conflict(out: Path, rank: int) -> dict[str, Any]:
    recorder = TraceRecorder()
    loop, model = make_loop(2, [RedirectTrainingStart(), recorder])
    try:
        loop.fit(model, epochs=2)
    except LoopError as exc:  # the expected outcome: the test checks which error
        return {**summary(loop, model, recorder), **raised(exc)}
    return summary(loop, model, recorder)


def _mismatch(out: Path, rank: int) -> dict[str, Any]:
    loop, model = make_loop(2, [TraceRecorder()] if rank == 0 else [])
    loop.fit(model, epochs=1)  # raises ConfigError: recorded by main()
    return summary(loop, model, None)


def _single_to_two(out: Path, rank: int) -> dict[str, Any]:
    """Resume, under two ranks, a checkpoint the test wrote in one process."""
    loop, model = make_loop(2)
    loop.fit(model, epochs=2, resume=out / "single")  # raises ConfigError
    return summary(loop, model, None)


def _writers(out: Path, rank: int) -> dict[str, Any]:
    """Every writer present in the tree, each in this rank's own directory."""
    where = out / "writers" / f"rank{rank}"
    callbacks: list[object] = [Checkpoint(where / "checkpoints", every_n_epochs=1)]
    present = ["Checkpoint"]
    for module, name, argument in (
        ("csv_logger", "CSVLogger", "log.csv"),
        ("structured", "StructuredLogger", "events.jsonl"),
        ("tensorboard", "TensorBoardLogger", "tensorboard"),
    ):
        try:
            cls = getattr(importlib.import_module(f"statemachine_loop.callbacks.{module}"), name)
        except (ImportError, AttributeError):
            continue
        callbacks.append(cls(where / argument))
        present.append(name)
    loop, model = make_loop(2, callbacks)
    loop.fit(model, epochs=2)
    # Every rank's files are complete before any rank looks at them.
    dist.barrier()
    return {**summary(loop, model, None), "writers": present}


def _straight(out: Path, rank: int) -> dict[str, Any]:
    loop, model = make_loop(2, shuffle=True, dropout=True, adam=True)
    loop.fit(model, epochs=3)
    return summary(loop, model, None)


def _preempt(out: Path, rank: int) -> dict[str, Any]:
    directory = out / "preempt"  # shared: rank 0 writes, every rank reads on resume
    loop, model = make_loop(
        2, [SigtermOnRank1(), Checkpoint(directory)], shuffle=True, dropout=True, adam=True
    )
    loop.fit(model, epochs=3)
    interrupted = summary(loop, model, None)
    dist.barrier()  # a restarted job would find the checkpoint complete
    loop, model = make_loop(
        2, [SigtermOnRank1(), Checkpoint(directory)], shuffle=True, dropout=True, adam=True
    )
    loop.fit(model, epochs=3, resume="auto")
    return {"interrupted": interrupted, "resumed": summary(loop, model, None)}


def _scheduled(out: Path, rank: int) -> dict[str, Any]:
    directory = out / "scheduled"
    checkpoint = Checkpoint(directory, every_n_epochs=None, every_n_batches=3, keep_last=100)
    loop, model = make_loop(2, [checkpoint], shuffle=True, dropout=True, adam=True)
    loop.fit(model, epochs=3)
    full = summary(loop, model, None)
    dist.barrier()
    saved = list_checkpoints(directory)
    chosen = saved[1]  # after training batch 6: epoch 1, mid-phase
    again = Checkpoint(out / "scheduled-resumed", every_n_epochs=None, every_n_batches=3)
    loop, model = make_loop(2, [again], shuffle=True, dropout=True, adam=True)
    loop.fit(model, epochs=3, resume=chosen.path)
    return {
        "full": full,
        "resumed": summary(loop, model, None),
        "checkpoints": [info.metadata for info in saved],
        "chosen": str(chosen.path),
    }


def raised(exc: BaseException) -> dict[str, Any]:
    return {
        "error": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


SCENARIOS: dict[str, Callable[[Path, int], dict[str, Any]]] = {
    "baseline": lambda out, rank: baseline(2),
    "observer_stop": _observer_stop,
    "guard_stop": _guard_stop,
    "guard_veto": _guard_veto,
    "conflict": _conflict,
    "mismatch": _mismatch,
    "single_to_two": _single_to_two,
    "writers": _writers,
    "straight": _straight,
    "preempt": _preempt,
    "scheduled": _scheduled,
}


def main(argv: list[str]) -> int:
    out, names = Path(argv[0]), argv[1:]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name in names:
        start = time.monotonic()
        try:
            result = SCENARIOS[name](out, rank)
        except Exception as exc:  # recorded for the test, which decides what was expected
            result = raised(exc)
        result["elapsed"] = time.monotonic() - start
        partial = out / f".{name}.rank{rank}.pt"
        torch.save(result, partial)
        os.replace(partial, out / f"{name}.rank{rank}.pt")
        print(f"rank {rank}: {name} done in {result['elapsed']:.2f}s", flush=True)
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        gc.collect()  # the scenarios' loops (and their DDP wrappers, which hold it) first
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

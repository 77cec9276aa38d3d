"""Per-batch losses: the loss metric's record, and the loggers that write from it.

``TrainingLoop.batch_losses`` returns the losses the built-in loss metric kept for the
current phase; ``CSVLogger`` and ``TensorBoardLogger`` write from it instead of
detaching every loss again, and detach a loss themselves only where the record has
none (a user's own ``loss`` metric; a stop between the loss and the metrics). Every
variant must write exactly the losses a callback reads per batch, and no logger may
hold a batch's loss (and so its autograd graph) past the next batch.
"""

from __future__ import annotations

import csv
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from statemachine_loop import Callback, Stop, TrainingLoop, Veto
from statemachine_loop.callbacks.csv_logger import CSVLogger
from statemachine_loop.callbacks.tensorboard import TensorBoardLogger
from tests.logging_helpers import make_loop
from tests.test_tensorboard import scalars


class PhaseLosses(Callback):
    """Per batch, the loss read at once; per phase end, what ``batch_losses`` returns."""

    def __init__(self) -> None:
        self.read: list[tuple[str, int, int, float | None]] = []
        self.recorded: list[list[float]] = []

    def on_batch_end(self, loop: TrainingLoop) -> None:
        if loop.failure is not None:
            return
        loss = loop.last_step_loss
        phase = "training" if loop.is_training else "validation"
        self.read.append(
            (phase, loop.epoch_index, loop.batch_index, None if loss is None else loss.item())
        )

    def on_training_end(self, loop: TrainingLoop) -> None:
        self._keep(loop)

    def on_validation_end(self, loop: TrainingLoop) -> None:
        self._keep(loop)

    def _keep(self, loop: TrainingLoop) -> None:
        record = loop.batch_losses()
        if record is not None:
            assert record.ndim == 1 and not record.requires_grad
            self.recorded.append(record.tolist())


class OwnLoss:
    """A user's own ``loss`` metric (a plain mean): it keeps no per-batch record."""

    name = "loss"

    def __init__(self) -> None:
        self.values: list[float] = []

    def reset(self) -> None:
        self.values = []

    def update(self, output: Any, target: Any, loss: torch.Tensor, batch_size: int) -> None:
        self.values.append(float(loss.detach()))

    def compute(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")


def csv_losses(path: Path) -> list[tuple[str, int, int, float | None]]:
    with path.open(newline="") as file:
        return [
            (
                row["phase"],
                int(row["epoch"]),
                int(row["batch"]),
                None if row["loss"] == "" else float(row["loss"]),
            )
            for row in csv.DictReader(file)
        ]


def float32(value: float | None) -> float | None:
    return None if value is None else torch.tensor(value, dtype=torch.float32).item()


def test_batch_losses_is_the_phase_record_of_the_loss_metric() -> None:
    watcher = PhaseLosses()
    loop, model = make_loop([watcher])
    assert loop.batch_losses() is not None  # the built-in loss metric keeps a record
    loop.fit(model, 2)
    phases = [("training", 6), ("validation", 3)] * 2
    assert [len(values) for values in watcher.recorded] == [count for _, count in phases]
    read = [loss for *_, loss in watcher.read]
    assert [value for values in watcher.recorded for value in values] == read


def test_a_user_loss_metric_keeps_no_record() -> None:
    loop, _ = make_loop([], metrics=[OwnLoss()])
    assert loop.batch_losses() is None


def test_an_unscored_batch_has_no_entry_in_the_record() -> None:
    class Unscored(Callback):
        def guard_inference_prediction_end(self, loop: TrainingLoop) -> Veto | None:
            return Veto("unscored") if loop.batch_index == 1 else None

    watcher = PhaseLosses()
    loop, model = make_loop([Unscored(), watcher])
    loop.fit(model, 1)
    validation = [loss for phase, _, _, loss in watcher.read if phase == "validation"]
    assert validation[1] is None
    assert watcher.recorded[1] == [validation[0], validation[2]]


class StopUpdateAt(Callback):
    """Stops at the training batch ``at``'s update_start: after its loss, before its metrics."""

    def __init__(self, at: int) -> None:
        self.at = at

    def guard_update_start(self, loop: TrainingLoop) -> Stop | None:
        return Stop("enough") if loop.batch_index == self.at else None


@pytest.mark.parametrize(
    "case", ["record", "own loss metric", "chunk every batch", "stop before the metrics"]
)
def test_csv_writes_the_loss_each_batch_had(tmp_path: Path, case: str) -> None:
    path = tmp_path / "log.csv"
    watcher = PhaseLosses()
    callbacks: list[Any] = [watcher, CSVLogger(path, flush_every=1e-9)]
    if case == "record":
        callbacks[1] = CSVLogger(path)
    if case == "stop before the metrics":
        callbacks.insert(0, StopUpdateAt(4))
    metrics = [OwnLoss()] if case == "own loss metric" else None
    loop, model = make_loop(callbacks, metrics=metrics)
    loop.fit(model, 2)
    written = csv_losses(path)
    # Nine digits give back each float32 loss bit for bit.
    assert [(*row[:3], float32(row[3])) for row in written] == watcher.read
    assert all(loss is not None for *_, loss in written)
    if case == "stop before the metrics":
        assert [batch for _, _, batch, _ in written] == [0, 1, 2, 3, 4]
        assert len(watcher.recorded[-1]) == 4  # the record lacks the stopped batch's loss


@pytest.mark.parametrize("case", ["record", "own loss metric", "stop before the metrics"])
def test_tensorboard_writes_the_loss_each_training_batch_had(tmp_path: Path, case: str) -> None:
    logger = TensorBoardLogger(tmp_path / "stats", flush_every=1e-9)
    watcher = PhaseLosses()
    callbacks: list[Any] = [watcher, logger]
    if case == "stop before the metrics":
        callbacks.insert(0, StopUpdateAt(4))
    loop, model = make_loop(callbacks, metrics=[OwnLoss()] if case == "own loss metric" else None)
    loop.fit(model, 2)
    assert logger.run_dir is not None
    written = [value for _, value in scalars(logger.run_dir / "training")["batch/loss"]]
    expected = [loss for phase, _, _, loss in watcher.read if phase == "training"]
    assert written == [float32(loss) for loss in expected]
    assert len(written) == (5 if case == "stop before the metrics" else 12)


def test_no_logger_keeps_a_batch_loss_alive_past_the_next_batch(tmp_path: Path) -> None:
    class Liveness(Callback):
        """At each batch_end, whether the previous batch's loss still exists."""

        def __init__(self) -> None:
            self.previous: weakref.ref[torch.Tensor] | None = None
            self.alive: list[bool] = []

        def on_batch_end(self, loop: TrainingLoop) -> None:
            if self.previous is not None:
                gc.collect()
                self.alive.append(self.previous() is not None)
            loss = loop.last_step_loss
            self.previous = None if loss is None else weakref.ref(loss)

    liveness = Liveness()
    loggers = [CSVLogger(tmp_path / "log.csv"), TensorBoardLogger(tmp_path / "stats")]
    loop, model = make_loop([liveness, *loggers], valid=0)  # it looks before they run
    loop.fit(model, 1)
    assert liveness.alive == [False] * 5

"""CSVLogger: a row per completed batch, whole lines only, phase values on phase-last rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from statemachine_loop import Callback, ConfigError, Stop, TrainingLoop, Veto
from statemachine_loop.callbacks.csv_logger import CSVLogger
from tests.logging_helpers import make_loop


class LossRecorder(Callback):
    """Keeps each finished batch's loss as a float (a test may sync per batch)."""

    def __init__(self) -> None:
        self.losses: list[tuple[str, int, int, float]] = []

    def on_batch_end(self, loop: TrainingLoop) -> None:
        if loop.failure is not None:
            return  # the wind-down's batch_end of the batch that raised
        phase = "training" if loop.is_training else "validation"
        assert loop.last_step_loss is not None
        self.losses.append((phase, loop.epoch_index, loop.batch_index, loop.last_step_loss.item()))


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        assert reader.fieldnames is not None
        return list(reader.fieldnames), rows


def test_one_row_per_batch_with_batch_losses_and_phase_values(tmp_path: Path) -> None:
    path = tmp_path / "run" / "log.csv"
    recorder = LossRecorder()
    loop, model = make_loop([CSVLogger(path), recorder])
    history = loop.fit(model, 2)
    header, rows = read_rows(path)
    assert header == ["epoch", "batch", "phase", "loss", "accuracy"]
    assert [(r["phase"], int(r["epoch"]), int(r["batch"])) for r in rows] == [
        (phase, epoch, batch) for phase, epoch, batch, _ in recorder.losses
    ]
    assert len(rows) == 2 * (6 + 3)
    for row, (*_, loss) in zip(rows, recorder.losses, strict=True):
        # The float32 loss reads back bit-for-bit from its nine written digits.
        assert torch.tensor(float(row["loss"]), dtype=torch.float32).item() == loss
    # accuracy is a phase value: empty on batch rows, the History value on the last row.
    last_rows = {(0, "training"): 5, (0, "validation"): 2, (1, "training"): 5, (1, "validation"): 2}
    for row in rows:
        key = (int(row["epoch"]), row["phase"])
        if int(row["batch"]) == last_rows[key]:
            entry = getattr(history, row["phase"])[int(row["epoch"])]
            assert float(row["accuracy"]) == pytest.approx(entry["accuracy"])
        else:
            assert row["accuracy"] == ""


def test_an_exception_mid_run_leaves_every_completed_row_and_no_partial_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.csv"
    recorder = LossRecorder()
    # forward calls: epoch 0 has 6 training + 3 validation; call 13 is epoch 1's 4th batch.
    loop, model = make_loop([CSVLogger(path), recorder], fail_at=13)
    with pytest.raises(RuntimeError, match="forward failed at call 13"):
        loop.fit(model, 3)
    text = path.read_text()
    assert text.endswith("\n")
    _, rows = read_rows(path)
    assert len(rows) == 6 + 3 + 3 == len(recorder.losses)
    assert all(len(line.split(",")) == 5 for line in text.splitlines())
    assert [int(r["batch"]) for r in rows[-3:]] == [0, 1, 2]
    assert all(r["loss"] != "" for r in rows)


class RowsOnDisk(Callback):
    """At each batch_start, how many data rows the CSV file holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows_seen: list[int] = []

    def on_batch_start(self, loop: TrainingLoop) -> None:
        self.rows_seen.append(len(self.path.read_text().splitlines()) - 1)


def test_rows_are_written_in_chunks_while_a_phase_runs(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    peek = RowsOnDisk(path)
    loop, model = make_loop([CSVLogger(path, flush_every=1e-9), peek], valid=0)
    loop.fit(model, 1)
    # At batch k's start, rows 0..k-2 are on disk: row k-1 waits, it may be the phase's last.
    assert peek.rows_seen == [0, 0, 1, 2, 3, 4]


def test_a_long_flush_interval_writes_only_at_phase_ends(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    peek = RowsOnDisk(path)
    loop, model = make_loop([CSVLogger(path, flush_every=3600), peek])
    loop.fit(model, 1)
    assert peek.rows_seen == [0] * 6 + [6] * 3


def test_vetoed_batches_have_no_row_and_unscored_batches_no_loss(tmp_path: Path) -> None:
    class Skipper(Callback):
        def guard_batch_start(self, loop: TrainingLoop) -> Veto | None:
            return Veto("skip") if loop.is_training and loop.batch_index == 1 else None

        def guard_inference_prediction_end(self, loop: TrainingLoop) -> Veto | None:
            return Veto("unscored") if loop.batch_index == 0 else None

    path = tmp_path / "log.csv"
    loop, model = make_loop([Skipper(), CSVLogger(path)])
    loop.fit(model, 1)
    _, rows = read_rows(path)
    assert [(r["phase"], int(r["batch"])) for r in rows] == [
        ("training", 0), ("training", 2), ("training", 3), ("training", 4), ("training", 5),
        ("validation", 0), ("validation", 1), ("validation", 2),
    ]  # fmt: skip
    assert [r["loss"] == "" for r in rows] == [False] * 5 + [True, False, False]


def test_a_stop_keeps_the_rows_so_far(tmp_path: Path) -> None:
    class StopAt(Callback):
        def guard_update_start(self, loop: TrainingLoop) -> Stop | None:
            return Stop("enough") if loop.batch_index == 2 else None

    path = tmp_path / "log.csv"
    loop, model = make_loop([StopAt(), CSVLogger(path)])
    loop.fit(model, 2)
    _, rows = read_rows(path)
    # batch 2 ran its forward pass and loss; its update was stopped; batch_end still closed it.
    assert [int(r["batch"]) for r in rows] == [0, 1, 2]
    assert all(r["loss"] for r in rows)
    assert rows[-1]["accuracy"] != ""


def test_each_fit_replaces_the_file_unless_appending(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    loop, model = make_loop([CSVLogger(path)], valid=0)
    loop.fit(model, 1)
    loop.fit(model, 1)
    assert len(read_rows(path)[1]) == 6
    appending, model = make_loop([CSVLogger(path, append=True)], valid=0)
    appending.fit(model, 1)
    text = path.read_text()
    assert text.count("epoch,batch,phase") == 1
    assert len(read_rows(path)[1]) == 12


def test_a_resumed_fit_appends(tmp_path: Path) -> None:
    from statemachine_loop.callbacks import Checkpoint

    path = tmp_path / "log.csv"
    loop, model = make_loop([Checkpoint(tmp_path / "ckpt"), CSVLogger(path)])
    loop.fit(model, 1)
    loop.fit(model, 2, resume=tmp_path / "ckpt")
    _, rows = read_rows(path)
    assert [int(r["epoch"]) for r in rows] == [0] * 9 + [1] * 9
    assert path.read_text().count("epoch,batch,phase") == 1


def test_appending_to_a_file_with_other_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("epoch,batch,phase,loss,top5_accuracy\n0,0,training,1.0,\n")
    loop, model = make_loop([CSVLogger(path, append=True)])
    with pytest.raises(ConfigError, match="header"):
        loop.fit(model, 1)


@pytest.mark.parametrize("every", [0, -1.0, True])
def test_flush_interval_must_be_positive(every: Any) -> None:
    with pytest.raises(ConfigError, match="flush_every"):
        CSVLogger(flush_every=every)

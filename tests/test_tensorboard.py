"""TensorBoardLogger, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX import SummaryWriter

from statemachine_loop import Callback, ConfigError, TrainingLoop
from statemachine_loop.callbacks.tensorboard import TensorBoardLogger, unique_run_dir
from tests.logging_helpers import make_loop


class LossRecorder(Callback):
    """Each completed training batch's loss and learning rate, read per batch (a test may)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.rates: list[float] = []

    def on_batch_end(self, loop: TrainingLoop) -> None:
        if loop.is_training and loop.failure is None:
            assert loop.last_step_loss is not None
            self.losses.append(loop.last_step_loss.item())
            self.rates.append(loop.optimizer.param_groups[0]["lr"])


class Decay(Callback):
    """Sets each training batch's learning rate at its start, as a schedule does: 0.1 / 2**k."""

    def __init__(self) -> None:
        self.batches = 0

    def on_batch_start(self, loop: TrainingLoop) -> None:
        if loop.is_training:
            loop.optimizer.param_groups[0]["lr"] = 0.1 * 0.5**self.batches
            self.batches += 1


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_epoch_scalars_of_both_phases_and_per_batch_training_curves(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path / "stats")
    recorder = LossRecorder()
    loop, model = make_loop([Decay(), recorder, logger])
    history = loop.fit(model, 2)
    assert logger.run_dir is not None and logger.run_dir.parent == tmp_path / "stats"
    assert sorted(p.name for p in logger.run_dir.iterdir()) == ["training", "validation"]
    training = scalars(logger.run_dir / "training")
    validation = scalars(logger.run_dir / "validation")
    assert set(training) == {"epoch/loss", "epoch/accuracy", "batch/loss", "batch/learning_rate"}
    assert set(validation) == {"epoch/loss", "epoch/accuracy"}
    for phase, found in (("training", training), ("validation", validation)):
        for name in ("loss", "accuracy"):
            expected = [(i, entry[name]) for i, entry in enumerate(getattr(history, phase))]
            assert [step for step, _ in found[f"epoch/{name}"]] == [0, 1]
            assert [v for _, v in found[f"epoch/{name}"]] == pytest.approx(
                [v for _, v in expected], rel=1e-6
            )
    assert [step for step, _ in training["batch/loss"]] == list(range(12))
    assert [v for _, v in training["batch/loss"]] == pytest.approx(recorder.losses, rel=1e-6)
    assert [v for _, v in training["batch/learning_rate"]] == pytest.approx(recorder.rates)
    assert recorder.rates == pytest.approx([0.1 * 0.5**k for k in range(12)])


def test_each_fit_gets_its_own_run_directory(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    loop, model = make_loop([logger], valid=0)
    loop.fit(model, 1)
    first = logger.run_dir
    loop.fit(model, 1)
    assert first is not None and logger.run_dir is not None and first != logger.run_dir
    assert {p.name for p in tmp_path.iterdir()} == {first.name, logger.run_dir.name}
    assert [p.name for p in logger.run_dir.iterdir()] == ["training"]


def test_batch_steps_are_positions_in_the_run_and_survive_a_resume(tmp_path: Path) -> None:
    from statemachine_loop.callbacks import Checkpoint

    logger = TensorBoardLogger(tmp_path / "stats")
    loop, model = make_loop([Checkpoint(tmp_path / "ckpt"), logger], valid=0)
    loop.fit(model, 1)
    first = logger.run_dir
    loop.fit(model, 2, resume=tmp_path / "ckpt")
    assert first is not None and logger.run_dir is not None
    steps = [[s for s, _ in scalars(d / "training")["batch/loss"]] for d in (first, logger.run_dir)]
    assert steps == [list(range(6)), list(range(6, 12))]
    assert [s for s, _ in scalars(logger.run_dir / "training")["epoch/loss"]] == [1]


def test_a_taken_run_name_gets_a_suffix(tmp_path: Path) -> None:
    names = [unique_run_dir(tmp_path, "20250101-120000").name for _ in range(3)]
    assert names == ["20250101-120000", "20250101-120000-1", "20250101-120000-2"]


def test_an_exception_mid_run_leaves_readable_files_and_closed_writers(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, flush_every=3600)
    recorder = LossRecorder()
    # epoch 0: 6 training + 3 validation forward calls; call 13 is epoch 1's 4th batch.
    loop, model = make_loop([recorder, logger], fail_at=13)
    with pytest.raises(RuntimeError, match="forward failed"):
        loop.fit(model, 3)
    assert logger._writers == {}  # closed during the wind-down
    assert logger.run_dir is not None
    training = scalars(logger.run_dir / "training")
    assert len(training["batch/loss"]) == 6 + 3 == len(recorder.losses)
    assert [v for _, v in training["batch/loss"]] == pytest.approx(recorder.losses, rel=1e-6)
    # epoch 1's training phase was cut short but ran 3 batches: its entry is logged too.
    assert [step for step, _ in training["epoch/loss"]] == [0, 1]
    assert [step for step, _ in scalars(logger.run_dir / "validation")["epoch/loss"]] == [0]


@pytest.mark.parametrize(("every", "expected"), [(1e-9, [0, 1, 2, 3, 4, 5]), (3600, [0] * 6)])
def test_per_batch_scalars_are_written_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: float, expected: list[int]
) -> None:
    # tensorboardX writes from a background thread, so count what the logger hands it.
    written: list[str] = []
    add_scalar = SummaryWriter.add_scalar

    def spy(self: SummaryWriter, tag: str, *args: Any, **kwargs: Any) -> Any:
        written.append(tag)
        return add_scalar(self, tag, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", spy)
    seen: list[int] = []

    class Peek(Callback):
        def on_batch_start(self, loop: TrainingLoop) -> None:
            seen.append(written.count("batch/loss"))

    loop, model = make_loop([TensorBoardLogger(tmp_path, flush_every=every), Peek()], valid=0)
    loop.fit(model, 1)
    assert seen == expected
    assert written.count("batch/loss") == 6


@pytest.mark.parametrize("every", [0, -5, False])
def test_flush_interval_must_be_positive(every: Any) -> None:
    with pytest.raises(ConfigError, match="flush_every"):
        TensorBoardLogger(flush_every=every)

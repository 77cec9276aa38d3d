"""The ``Checkpoint`` callback: schedules, rotation, ``resume="auto"``, preemption, failures.

Every file is written for real under ``tmp_path``; corruption is a truncated file, a
full disk is ``os.write`` failing with ``ENOSPC`` inside ``checkpoint_io`` only, and
preemption is a real ``SIGTERM``/``SIGINT`` sent by the test process to itself.
"Bit-equal" always means ``torch.equal`` on every parameter against a straight run
that had no checkpoints at all.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Callback, ConfigError, Event, Stop, TrainingLoop
from statemachine_loop import checkpoint_io as io
from statemachine_loop.callbacks.checkpoint import Checkpoint
from statemachine_loop.checkpoint_io import CheckpointError, CheckpointWarning
from statemachine_loop.testing import TraceRecorder

E = Event
BATCH = 4


@attrs.define
class World:
    loop: TrainingLoop
    model: torch.nn.Module
    recorder: TraceRecorder


def make_world(batches: int = 6, val: int = 2, callbacks: Sequence[Any] = ()) -> World:
    """Seeded shuffling, dropout, momentum: everything a resume must restore."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((batches + val) * BATCH, 5, generator=generator)
    y = torch.randint(0, 3, (len(x),), generator=generator)
    split = batches * BATCH
    order = torch.Generator().manual_seed(2)
    training = DataLoader(
        TensorDataset(x[:split], y[:split]), batch_size=BATCH, shuffle=True, generator=order
    )
    validation = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=BATCH)
    recorder = TraceRecorder()
    loop = TrainingLoop(
        training=training,
        validation=validation if val else None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy"],
        callbacks=[*callbacks, recorder],
    )
    return World(loop, model, recorder)


def straight_parameters(epochs: int = 2, **world: Any) -> list[torch.Tensor]:
    """The final parameters of an uninterrupted run without any checkpointing."""
    straight = make_world(**world)
    straight.loop.fit(straight.model, epochs)
    return [p.detach().clone() for p in straight.model.parameters()]


def same(parameters: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return all(map(torch.equal, parameters, model.parameters()))


def positions(directory: Path) -> list[tuple[int, str, int]]:
    """(epoch, state, batch) of every checkpoint on disk, oldest first."""
    found = io.list_checkpoints(directory)
    return [
        (c.metadata["epoch_index"], c.metadata["state"], c.metadata["batch_index"]) for c in found
    ]


class At(Callback):
    """Runs ``action(loop)`` in the observer of ``event`` at (epoch, batch) in training."""

    def __init__(self, event: Event, epoch: int, batch: int, action: Any) -> None:
        self.where, self.action = (epoch, batch), action
        setattr(self, f"on_{event.value}", self._observe)

    def _observe(self, loop: TrainingLoop) -> Any:
        if loop.is_training and (loop.epoch_index, loop.batch_index) == self.where:
            return self.action(loop)
        return None


# -- schedules and rotation ------------------------------------------------------------


def test_every_n_epochs(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path, every_n_epochs=2, keep_last=10)
    world = make_world(batches=2, callbacks=[checkpoint])
    world.loop.fit(world.model, 5)
    assert [(e, s) for e, s, _ in positions(tmp_path)] == [(1, "fit"), (3, "fit")]
    assert {c.metadata["reason"] for c in checkpoint.saved} == {"schedule"}


def test_every_n_batches_counts_training_batches_across_a_resume(tmp_path: Path) -> None:
    def checkpoint(directory: Path) -> Checkpoint:
        return Checkpoint(directory, every_n_epochs=None, every_n_batches=3, keep_last=10)

    world = make_world(batches=4, val=2, callbacks=[checkpoint(tmp_path / "a")])
    world.loop.fit(world.model, 3)
    # Training batches 3, 6, 9, 12 of 4 per epoch; validation batches do not count.
    expected = [(0, "training", 2), (1, "training", 1), (2, "training", 0), (2, "training", 3)]
    assert positions(tmp_path / "a") == expected
    first = io.list_checkpoints(tmp_path / "a")[0].path
    resumed = make_world(batches=4, val=2, callbacks=[checkpoint(tmp_path / "b")])
    resumed.loop.fit(resumed.model, 3, resume=first)
    assert positions(tmp_path / "b") == expected[1:]
    assert same([p.detach() for p in world.model.parameters()], resumed.model)


def test_keep_last_rotates_old_checkpoints_away(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path, every_n_epochs=None, every_n_batches=1, keep_last=2)
    world = make_world(batches=5, val=0, callbacks=[checkpoint])
    world.loop.fit(world.model, 1)
    assert len(checkpoint.saved) == 5
    assert positions(tmp_path) == [(0, "training", 3), (0, "training", 4)]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".pt", ".pt"]


def _diverging_world(callbacks: Sequence[Any]) -> World:
    """Training pulls a bias towards +1, validation wants -1: validation loss only grows."""
    model = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    data = [(torch.zeros(2, 1), torch.ones(2, 1))]
    recorder = TraceRecorder()
    loop = TrainingLoop(
        training=data,
        validation=[(torch.zeros(2, 1), -torch.ones(2, 1))],
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.mse_loss,
        callbacks=[*callbacks, recorder],
    )
    return World(loop, model, recorder)


@pytest.mark.parametrize(("mode", "kept"), [("min", [0, 3]), ("max", [3])])
def test_keep_best_keeps_the_best_however_old(tmp_path: Path, mode: str, kept: list[int]) -> None:
    checkpoint = Checkpoint(
        tmp_path,
        keep_last=1,
        monitor="validation/loss",
        mode=mode,
        keep_best=1,  # type: ignore[arg-type]
    )
    world = _diverging_world([checkpoint])
    history = world.loop.fit(world.model, 4)
    losses = [entry["loss"] for entry in history.validation]
    assert losses == sorted(losses) and losses[0] < losses[-1]
    assert [e for e, _, _ in positions(tmp_path)] == kept
    on_disk = [c.metadata["monitor_value"] for c in io.list_checkpoints(tmp_path)]
    assert on_disk == [losses[epoch] for epoch in kept]


def test_an_unknown_monitored_metric_names_the_ones_that_exist(tmp_path: Path) -> None:
    world = make_world(batches=2, callbacks=[Checkpoint(tmp_path, monitor="validation/acc")])
    with pytest.raises(ConfigError, match=r"validation/acc.*\['accuracy', 'loss'\]"):
        world.loop.fit(world.model, 2)
    assert world.recorder.events.count(E.FIT_END) == 1


@pytest.mark.parametrize(
    "arguments",
    [
        {"every_n_epochs": 0},
        {"every_n_epochs": True},
        {"every_n_batches": -1},
        {"every_n_batches": 2.0},
        {"keep_last": 0},
        {"keep_best": 0},
        {"mode": "avg"},
        {"monitor": "loss"},
        {"monitor": "test/loss"},
        {"monitor": "validation/loss/x"},
    ],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, arguments: dict[str, Any]) -> None:
    ((name, value),) = arguments.items()
    with pytest.raises(ConfigError, match=f"{name}.*{value!r}"):
        Checkpoint(tmp_path, **arguments)


# -- resume="auto" ------------------------------------------------------------------------------


@pytest.mark.parametrize("exists", [True, False])
def test_auto_with_no_checkpoint_starts_fresh(tmp_path: Path, exists: bool) -> None:
    directory = tmp_path / "checkpoints"
    if exists:
        directory.mkdir()
    world = make_world(callbacks=[Checkpoint(directory)])
    world.loop.fit(world.model, 2, resume="auto")
    assert world.loop.resumed_from is None
    assert not any(entry.resuming for entry in world.recorder.entries)
    assert same(straight_parameters(), world.model)


def test_auto_without_a_checkpoint_callback_is_a_config_error() -> None:
    world = make_world()
    with pytest.raises(ConfigError, match="Checkpoint callback"):
        world.loop.fit(world.model, 2, resume="auto")
    assert world.recorder.entries == []


def test_auto_skips_a_truncated_newest_checkpoint(tmp_path: Path) -> None:
    def stop(loop: TrainingLoop) -> Stop:
        return Stop("interrupted")

    checkpoint = Checkpoint(tmp_path, every_n_epochs=None, every_n_batches=2, keep_last=5)
    interrupted = make_world(callbacks=[checkpoint, At(E.BATCH_END, 1, 2, stop)])
    interrupted.loop.fit(interrupted.model, 2)
    assert positions(tmp_path)[-2:] == [(0, "training", 5), (1, "training", 1)]
    newest, previous = checkpoint.saved[-1], checkpoint.saved[-2]
    os.truncate(newest.path, newest.size // 2)
    resumed = make_world(callbacks=[Checkpoint(tmp_path, every_n_epochs=None, every_n_batches=2)])
    with pytest.warns(CheckpointWarning, match=rf"{newest.manifest.name}.*truncated"):
        resumed.loop.fit(resumed.model, 2, resume="auto")
    assert resumed.loop.resumed_from == str(previous.path)
    assert same(straight_parameters(), resumed.model)


# -- preemption ---------------------------------------------------------------------------------


@pytest.fixture
def custom_handlers() -> Iterator[dict[int, Any]]:
    """Custom SIGTERM and SIGINT handlers for the test, the originals back afterwards."""

    def custom(signum: int, frame: types.FrameType | None) -> None:
        raise AssertionError(f"the test's own handler got signal {signum}")

    handlers = {signal.SIGTERM: custom, signal.SIGINT: custom}
    originals = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield dict(handlers)
    finally:
        for signum, handler in originals.items():
            signal.signal(signum, handler)


def _send(*signums: int) -> Any:
    def send(loop: TrainingLoop) -> None:
        for signum in signums:
            os.kill(os.getpid(), signum)

    return send


def test_sigterm_checkpoints_at_the_next_boundary_and_stops(
    tmp_path: Path, custom_handlers: dict[int, Any]
) -> None:
    world = make_world(
        callbacks=[Checkpoint(tmp_path), At(E.BATCH_END, 1, 2, _send(signal.SIGTERM))]
    )
    world.loop.fit(world.model, 2)
    assert world.loop.stop_reason is not None and world.loop.stop_reason.startswith("preempted")
    newest = io.list_checkpoints(tmp_path)[-1]
    assert newest.metadata["reason"] == "preempted"
    payload, _ = io.load_checkpoint(newest.path)
    # Checkpoint observes the same batch_end after the signal (it runs last): that
    # boundary, after batch 2, is where it saves.
    position = {"state": "training", "epoch_index": 1, "batch_index": 2, "next_batch": 3}
    assert payload["position"].items() >= position.items()
    events = world.recorder.events
    assert events.count(E.FIT_END) == 1 and events[-1] is E.FIT_END
    assert events.count(E.BATCH_START) == 6 + 2 + 3  # batch 3 of epoch 1 never started
    assert {s: signal.getsignal(s) for s in custom_handlers} == custom_handlers
    resumed = make_world(callbacks=[Checkpoint(tmp_path)])
    resumed.loop.fit(resumed.model, 2, resume="auto")
    assert resumed.loop.resumed_from == str(newest.path)
    assert same(straight_parameters(), resumed.model)


def test_preemption_before_the_first_batch_resumes_exactly(
    tmp_path: Path, custom_handlers: dict[int, Any]
) -> None:
    class Preempt(Callback):
        def on_training_start(self, loop: TrainingLoop) -> None:
            if loop.epoch_index == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    world = make_world(callbacks=[Checkpoint(tmp_path), Preempt()])
    world.loop.fit(world.model, 2)
    # The next exact boundary is the end of that phase's first batch (batch 0).
    assert positions(tmp_path)[-1] == (1, "training", 0)
    resumed = make_world(callbacks=[Checkpoint(tmp_path)])
    resumed.loop.fit(resumed.model, 2, resume="auto")
    assert same(straight_parameters(), resumed.model)


def test_a_second_sigint_aborts_at_once(tmp_path: Path, custom_handlers: dict[int, Any]) -> None:
    send = _send(signal.SIGINT, signal.SIGINT)
    world = make_world(callbacks=[Checkpoint(tmp_path), At(E.BATCH_END, 0, 1, send)])
    with pytest.raises(KeyboardInterrupt):
        world.loop.fit(world.model, 2)
    events = world.recorder.events
    # Aborted inside batch 1's batch_end: only the wind-down's ends follow, fit_end once.
    last_batch_end = len(events) - 1 - events[::-1].index(E.BATCH_END)
    assert events[last_batch_end:] == [E.BATCH_END, E.TRAINING_END, E.EPOCH_END, E.FIT_END]
    assert events.count(E.BATCH_START) == 2
    assert world.recorder.entries[-1].failed
    assert {s: signal.getsignal(s) for s in custom_handlers} == custom_handlers


# -- failed writes ------------------------------------------------------------------------------


class _FailingOs:
    """``os`` for checkpoint_io only, whose ``write`` fails with ENOSPC once armed."""

    armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if self.armed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)


@pytest.mark.parametrize("failure", ["full disk", "read-only directory"])
def test_a_failed_write_is_a_checkpoint_error_and_keeps_the_old_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    failing = _FailingOs()
    monkeypatch.setattr(io, "os", failing)

    def break_disk(loop: TrainingLoop) -> None:
        if failure == "full disk":
            failing.armed = True
        elif os.geteuid() == 0:  # root ignores permissions: refuse as the kernel would

            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        else:
            tmp_path.chmod(0o500)

    checkpoint = Checkpoint(tmp_path, every_n_epochs=None, every_n_batches=2, keep_last=5)
    world = make_world(callbacks=[checkpoint, At(E.BATCH_END, 0, 4, break_disk)])
    try:
        with pytest.raises(CheckpointError) as caught:
            world.loop.fit(world.model, 2)
    finally:
        tmp_path.chmod(0o700)
        monkeypatch.undo()
    expected = errno.ENOSPC if failure == "full disk" else errno.EACCES
    assert caught.value.errno == expected and "Existing checkpoints were not modified" in str(
        caught.value
    )
    assert world.recorder.events.count(E.FIT_END) == 1
    assert positions(tmp_path) == [(0, "training", 1), (0, "training", 3)]
    for info in io.list_checkpoints(tmp_path):
        io.load_checkpoint(info.path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

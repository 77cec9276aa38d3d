"""ProgressBar: one plain line per phase off a terminal, a rich display on one, cheap per batch."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from rich.console import Console

from statemachine_loop import Callback, ConfigError, Event, Stop, TrainingLoop
from statemachine_loop.callbacks import progress as progress_module
from statemachine_loop.callbacks._phases import format_value
from statemachine_loop.callbacks.progress import ProgressBar


class CountingAccuracy:
    """A metric that counts how often its value is read (each read is a device sync)."""

    name = "counted"

    def __init__(self) -> None:
        self.reads = 0
        self.total = 0.0
        self.batches = 0

    def reset(self) -> None:
        self.total, self.batches = 0.0, 0

    def update(self, output: Any, target: Any, loss: Any, batch_size: int) -> None:
        self.batches += 1

    def compute(self) -> float:
        self.reads += 1
        return float(self.batches)


def make_loop(
    callbacks: list[Any], *, train: int = 6, valid: int = 3, metrics: list[Any] | None = None
) -> tuple[TrainingLoop, torch.nn.Module]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((train + valid) * 4, 4, generator=generator)
    y = (x.sum(1, keepdim=True) > 0).float()
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(x), 4)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    loop = TrainingLoop(
        training=batches[:train],
        validation=batches[train:] or None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.binary_cross_entropy_with_logits,
        metrics=metrics if metrics is not None else ["accuracy"],
        callbacks=callbacks,
    )
    return loop, model


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def plain_console() -> tuple[Console, io.StringIO]:
    stream = io.StringIO()
    return Console(file=stream), stream


def test_off_a_terminal_one_plain_line_per_phase() -> None:
    console, stream = plain_console()
    loop, model = make_loop([ProgressBar(console)])
    history = loop.fit(model, 2)
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 4
    for line, (epoch, phase, batches) in zip(
        lines,
        [(1, "training", 6), (1, "validation", 3), (2, "training", 6), (2, "validation", 3)],
        strict=True,
    ):
        assert line.startswith(f"epoch {epoch}/2 {phase}: {batches} batches in ")
        entry = getattr(history, phase)[epoch - 1]
        assert f"loss {format_value(entry['loss'])}" in line
        assert f"accuracy {format_value(entry['accuracy'])}" in line


def test_default_console_writes_plain_lines_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    loop, model = make_loop([ProgressBar()], valid=0)
    loop.fit(model, 3)
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert [line.split(":")[0] for line in out.splitlines()] == [
        f"epoch {epoch}/3 training" for epoch in (1, 2, 3)
    ]


def test_off_a_terminal_no_metric_value_is_read_per_batch() -> None:
    def reads(callbacks: list[Any]) -> int:
        metric = CountingAccuracy()
        loop, model = make_loop(callbacks, train=20, metrics=[metric])
        loop.fit(model, 2)
        return metric.reads

    console, _ = plain_console()
    assert reads([ProgressBar(console)]) == reads([])


def test_on_a_terminal_refreshes_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(i * 0.01 for i in range(10**6))  # every time check advances 10 ms
    monkeypatch.setattr(progress_module, "monotonic", lambda: next(clock))
    metric = CountingAccuracy()
    baseline_metric = CountingAccuracy()
    baseline, baseline_model = make_loop([], train=100, valid=0, metrics=[baseline_metric])
    baseline.fit(baseline_model, 1)
    console = Console(force_terminal=True, file=io.StringIO(), width=150)
    loop, model = make_loop([ProgressBar(console)], train=100, valid=0, metrics=[metric])
    loop.fit(model, 1)
    # 100 batches over ~1 s of fake time at 10 refreshes a second: about 10 reads.
    extra_reads = metric.reads - baseline_metric.reads
    assert 5 <= extra_reads <= 12


def test_on_a_terminal_shows_an_animated_display_and_the_phase_lines() -> None:
    stream = io.StringIO()
    console = Console(force_terminal=True, file=stream, width=150)
    loop, model = make_loop([ProgressBar(console, refresh_per_second=1e6)])
    loop.fit(model, 1)
    text = stream.getvalue()
    assert "\x1b" in text  # cursor movement and colours: a live display
    assert "epoch 1/1 training" in text and "6/6" in text and "batches/s" in text
    assert "accuracy" in text
    assert "epoch 1/1 training: 6 batches in " in text
    assert "epoch 1/1 validation: 3 batches in " in text
    assert text.rstrip("\r").endswith("\x1b[?25h")  # the display stopped and gave the cursor back


def test_the_display_stops_after_an_exception() -> None:
    class Boom(Callback):
        def on_batch_end(self, loop: TrainingLoop) -> None:
            if loop.batch_index == 2:
                raise RuntimeError("boom")

    stream = io.StringIO()
    console = Console(force_terminal=True, file=stream, width=150)
    bar = ProgressBar(console)
    loop, model = make_loop([bar, Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        loop.fit(model, 1)
    text = stream.getvalue()
    assert "(interrupted by RuntimeError)" in text
    assert text.rstrip("\r").endswith("\x1b[?25h")


def test_a_stop_is_named_on_the_phase_line() -> None:
    class StopEarly(Callback):
        def guard_batch_start(self, loop: TrainingLoop) -> Stop | None:
            return Stop("enough") if loop.batch_index == 3 else None

    console, stream = plain_console()
    loop, model = make_loop([StopEarly(), ProgressBar(console)])
    loop.fit(model, 2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("epoch 1/2 training: 3 batches in ")
    assert lines[0].endswith("(stopped: enough)")


@pytest.mark.parametrize("rate", [0, -1, True, "fast"])
def test_refresh_rate_must_be_positive(rate: Any) -> None:
    with pytest.raises(ConfigError, match="refresh_per_second"):
        ProgressBar(refresh_per_second=rate)


def test_off_a_terminal_it_hooks_no_batch_event() -> None:
    from statemachine_loop.callback import collect_hooks
    from statemachine_loop.events import BATCH_EVENTS

    console, stream = plain_console()
    plain = collect_hooks([ProgressBar(console)])
    assert plain.observed.isdisjoint(BATCH_EVENTS) and plain.guarded.isdisjoint(BATCH_EVENTS)
    assert not plain.mid_phase  # nothing runs inside a phase, so no phase-start snapshot
    terminal = Console(force_terminal=True, file=io.StringIO())
    assert collect_hooks([ProgressBar(terminal)]).observed & set(BATCH_EVENTS) == {Event.BATCH_END}

    # It still counts every batch: the phase's count is the loop's batches_run.
    loop, model = make_loop([ProgressBar(console)], valid=0)
    loop.fit(model, 2)
    assert stream.getvalue().count(" 6 batches in ") == 2


def test_the_line_counts_the_batches_that_ran_not_the_vetoed_ones() -> None:
    from statemachine_loop import Veto

    class SkipOdd(Callback):
        def __init__(self) -> None:
            self.counts: list[int] = []

        def guard_batch_start(self, loop: TrainingLoop) -> Veto | None:
            return Veto("odd") if loop.batch_index % 2 else None

        def on_training_end(self, loop: TrainingLoop) -> None:
            self.counts.append(loop.batches_run)

    console, stream = plain_console()
    skip = SkipOdd()
    loop, model = make_loop([skip, ProgressBar(console)], train=7, valid=0)
    loop.fit(model, 2)
    assert skip.counts == [4, 4]  # batches 0, 2, 4, 6 of each epoch
    assert stream.getvalue().count(" 4 batches in ") == 2

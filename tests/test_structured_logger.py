"""StructuredLogger: one JSON line per taken transition, epoch-sized at INFO, private structlog."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from statemachine_loop import Callback, ConfigError, Event, Redirect, Stop, TrainingLoop, Veto
from statemachine_loop.callback import collect_hooks
from statemachine_loop.callbacks.structured import FIELD_ORDER, StructuredLogger
from statemachine_loop.cli import main
from statemachine_loop.events import BATCH_EVENTS
from statemachine_loop.testing import TraceRecorder
from tests.logging_helpers import Net
from tests.logging_helpers import make_loop as shared_loop


def make_loop(
    callbacks: list[Any], *, train: int = 4, valid: int = 2, fail_at: int | None = None
) -> tuple[TrainingLoop, Net]:
    return shared_loop(callbacks, train=train, valid=valid, fail_at=fail_at)


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def read(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [strict_json(line) for line in text.splitlines()]


def transitions(records: list[dict[str, Any]]) -> list[str]:
    return [r["event"] for r in records if r["kind"] == "transition"]


def test_info_logs_every_non_batch_transition_and_the_phase_metrics(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    recorder = TraceRecorder()
    loop, model = make_loop([recorder, StructuredLogger(path)])
    history = loop.fit(model, 2)
    records = read(path)
    epoch = [
        ("transition", "epoch_start"),
        ("transition", "training_start"),
        ("transition", "training_end"),
        ("metrics", "training_end"),
        ("transition", "validation_start"),
        ("transition", "validation_end"),
        ("metrics", "validation_end"),
        ("transition", "epoch_end"),
    ]
    assert [(r["kind"], r["event"]) for r in records] == [
        ("transition", "fit_start"),
        *epoch * 2,
        ("transition", "fit_end"),
    ]
    batch_events = {event.value for event in BATCH_EVENTS}
    assert transitions(records) == [e.value for e in recorder.events if e not in batch_events]
    for record in records:
        assert list(record)[: len(FIELD_ORDER)] == list(FIELD_ORDER)
        assert record["level"] == "info"
        assert record["run_id"] == records[0]["run_id"]
        assert datetime.fromisoformat(record["timestamp"]).tzinfo is not None
    metrics = [r for r in records if r["kind"] == "metrics"]
    assert [(r["phase"], r["epoch_index"], r["metrics"]) for r in metrics] == [
        (phase, epoch, {k: v for k, v in getattr(history, phase)[epoch].items() if k != "epoch"})
        for epoch in (0, 1)
        for phase in ("training", "validation")
    ]
    by_event = {r["event"]: r for r in records if r["kind"] == "transition"}
    assert by_event["fit_start"]["epoch_count"] == 2
    assert by_event["fit_start"]["metric_names"] == ["loss", "accuracy"]
    assert by_event["training_start"]["batch_count"] == 4
    assert (
        by_event["validation_start"]["from_state"],
        by_event["validation_start"]["to_state"],
    ) == (
        "trained",
        "validation",
    )
    assert by_event["fit_end"]["stop_reason"] is None and by_event["fit_end"]["failure"] is None


def test_at_info_the_callback_is_not_even_called_per_batch() -> None:
    logger = StructuredLogger("unused.jsonl")
    hooks = collect_hooks([logger])
    for event in BATCH_EVENTS:
        assert getattr(logger, f"on_{event.value}") is None
        assert hooks.observers[event] == ()
    assert len(hooks.observers[Event.EPOCH_END]) == 1
    debug_hooks = collect_hooks([StructuredLogger("unused.jsonl", level="debug")])
    assert all(len(debug_hooks.observers[event]) == 1 for event in Event)


def test_debug_logs_every_transition_with_its_batch_index(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    recorder = TraceRecorder()
    loop, model = make_loop([recorder, StructuredLogger(path, level="debug")])
    loop.fit(model, 1)
    records = read(path)
    assert transitions(records) == [e.value for e in recorder.events]
    batch = [r for r in records if r["event"] == "batch_end"]
    assert [(r["level"], r["phase"], r["batch_index"]) for r in batch] == [
        ("debug", "training", i) for i in range(4)
    ] + [("debug", "validation", i) for i in range(2)]
    assert main(["logs", "validate", str(path)]) == 0


def test_decisions_are_logged_once_with_the_next_record(tmp_path: Path) -> None:
    class Decider(Callback):
        def guard_update_start(self, loop: TrainingLoop) -> Veto | None:
            return Veto("accumulate") if loop.batch_index == 1 else None

        def guard_validation_start(self, loop: TrainingLoop) -> Redirect | None:
            return (
                Redirect(Event.EPOCH_END, "no validation in epoch 0")
                if loop.epoch_index == 0
                else None
            )

        def on_validation_end(self, loop: TrainingLoop) -> Stop:
            return Stop("validated once")

    path = tmp_path / "events.jsonl"
    loop, model = make_loop([StructuredLogger(path), Decider()])  # the logger runs last anyway
    loop.fit(model, 5)
    records = read(path)
    logged = [(r["event"], d) for r in records if r["kind"] == "transition" for d in r["decisions"]]
    assert [(d["kind"], d["event"], d["reason"]) for _, d in logged] == [
        ("veto", "update_start", "accumulate"),
        ("redirect", "validation_start", "no validation in epoch 0"),
        ("veto", "update_start", "accumulate"),
        ("stop", "validation_end", "validated once"),
    ]
    # Each decision is in the first record written after it was taken.
    assert [event for event, _ in logged[:3]] == ["training_end", "epoch_end", "training_end"]
    # An observer's stop is recorded once every observer of the event has run, so it
    # lands in that event's record or in the next one, depending on the engine.
    assert logged[3][0] in ("validation_end", "epoch_end")
    assert len(logged) == len(loop.decisions)
    stops = [r for r in records if r["kind"] == "stop"]
    assert len(stops) == 1
    assert (stops[0]["event"], stops[0]["reason"], stops[0]["callback"]) == (
        "validation_end",
        "validated once",
        "Decider",
    )
    assert records[-1]["event"] == "fit_end" and records[-1]["stop_reason"] == "validated once"
    assert main(["logs", "validate", str(tmp_path)]) == 0


def test_an_exception_mid_run_leaves_a_valid_log_with_a_failure_record(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    # forward calls: epoch 0 has 4 training + 2 validation; call 9 is epoch 1's 3rd batch.
    loop, model = make_loop([StructuredLogger(path)], fail_at=9)
    with pytest.raises(RuntimeError, match="forward failed at call 9"):
        loop.fit(model, 3)
    records = read(path)
    failures = [r for r in records if r["kind"] == "failure"]
    assert len(failures) == 1
    failure = failures[0]
    assert failure["level"] == "error"
    assert failure["exception_type"] == "RuntimeError"
    assert failure["message"] == "forward failed at call 9"
    assert (failure["epoch_index"], failure["phase"]) == (1, "training")
    assert transitions(records)[-3:] == ["training_end", "epoch_end", "fit_end"]
    assert records[-1]["failure"] == "RuntimeError"
    assert main(["logs", "validate", str(tmp_path)]) == 0


def test_a_resumed_fit_is_marked(tmp_path: Path) -> None:
    from statemachine_loop.callbacks import Checkpoint

    path = tmp_path / "events.jsonl"
    loop, model = make_loop([Checkpoint(tmp_path / "ckpt"), StructuredLogger(path)])
    loop.fit(model, 1)
    loop.fit(model, 2, resume=tmp_path / "ckpt")
    records = read(path)  # a resumed fit appends: both fits are in the file
    resume = [r for r in records if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["resumed_from"] == loop.resumed_from
    second = [r for r in records if r["run_id"] == resume[0]["run_id"]]
    assert second[0]["event"] == "fit_start" and second[0]["resuming"] is True
    # checkpointed between epochs: only fit_start re-enters, then epoch 1 starts
    assert (second[2]["event"], second[2]["epoch_index"], second[2]["resuming"]) == (
        "epoch_start",
        1,
        False,
    )
    assert second[0]["resumed_from"] == loop.resumed_from
    assert [r["epoch_index"] for r in second if r["kind"] == "metrics"] == [1, 1]
    assert records[0]["resuming"] is False and records[0]["resumed_from"] is None
    assert main(["logs", "validate", str(path)]) == 0


def test_a_raising_observer_does_not_hide_the_transition_from_the_log(tmp_path: Path) -> None:
    class Boom(Callback):
        def on_validation_start(self, loop: TrainingLoop) -> None:
            raise KeyError("missing batch")

    path = tmp_path / "events.jsonl"
    loop, model = make_loop([Boom(), StructuredLogger(path)])
    with pytest.raises(KeyError):
        loop.fit(model, 2)
    records = read(path)
    assert [(r["kind"], r["event"]) for r in records][-5:] == [
        ("transition", "validation_start"),
        ("failure", "validation_end"),
        ("transition", "validation_end"),
        ("transition", "epoch_end"),
        ("transition", "fit_end"),
    ]
    assert main(["logs", "validate", str(path)]) == 0


def test_the_users_structlog_configuration_is_neither_changed_nor_used(tmp_path: Path) -> None:
    was_configured = structlog.is_configured()
    config = structlog.get_config()
    loop, model = make_loop([StructuredLogger(tmp_path / "events.jsonl", level="debug")])
    loop.fit(model, 1)
    assert structlog.is_configured() == was_configured
    assert structlog.get_config() == config
    # capture_logs configures structlog globally; a logger that used the global
    # configuration would have its records captured here.
    with structlog.testing.capture_logs() as captured:
        loop.fit(model, 1)
    assert captured == []


def test_console_renders_records_for_humans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loop, model = make_loop([StructuredLogger(tmp_path / "e.jsonl", console=True)], valid=0)
    loop.fit(model, 1)
    err = capsys.readouterr().err
    assert "\x1b" not in err  # not a terminal: no colours
    lines = err.splitlines()
    assert len(lines) == len(read(tmp_path / "e.jsonl"))
    assert "fit_start" in lines[0] and "from_state=idle" in lines[0]
    assert "decisions" not in err  # empty fields are left out for people


def test_level_warning_keeps_only_stops_and_failures(tmp_path: Path) -> None:
    class StopNow(Callback):
        def on_epoch_end(self, loop: TrainingLoop) -> Stop:
            return Stop("one epoch")

    path = tmp_path / "events.jsonl"
    loop, model = make_loop([StopNow(), StructuredLogger(path, level="WARNING")])
    loop.fit(model, 3)
    assert [(r["kind"], r["level"], r["reason"]) for r in read(path)] == [
        ("stop", "warning", "one epoch")
    ]
    loop, model = make_loop([StructuredLogger(path, level="error")], fail_at=2)
    with pytest.raises(RuntimeError):
        loop.fit(model, 1)
    assert [r["kind"] for r in read(path)] == ["failure"]


def test_non_finite_metrics_are_strings_so_the_file_stays_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    loop, model = make_loop([StructuredLogger(path)], valid=0)
    loop.optimizer.param_groups[0]["lr"] = float("inf")  # the loss becomes nan after one step
    loop.fit(model, 1)
    metrics = [r for r in read(path) if r["kind"] == "metrics"]
    assert metrics[0]["metrics"]["loss"] == "nan"


def test_other_callbacks_can_add_records_to_the_run(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    logger = StructuredLogger(path)

    class Checkpointer(Callback):
        def on_epoch_end(self, loop: TrainingLoop) -> None:
            logger.record(loop, "checkpoint", Event.EPOCH_END, path="ckpt/epoch0.pt")

    loop, model = make_loop([Checkpointer(), logger])
    loop.fit(model, 1)
    records = read(path)
    checkpoint = [r for r in records if r["kind"] == "checkpoint"]
    assert len(checkpoint) == 1
    assert checkpoint[0]["path"] == "ckpt/epoch0.pt"
    assert checkpoint[0]["run_id"] == records[0]["run_id"]
    assert main(["logs", "validate", str(path)]) == 0


def test_each_fit_gets_a_new_run_id_and_replaces_the_file_unless_appending(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    logger = StructuredLogger(path, append=True)
    loop, model = make_loop([logger], valid=0)
    loop.fit(model, 1)
    first = logger.run_id
    loop.fit(model, 1)
    records = read(path)
    assert first != logger.run_id
    assert [r["run_id"] for r in records if r["event"] == "fit_start"] == [first, logger.run_id]
    assert main(["logs", "validate", str(path)]) == 0
    replacing, model = make_loop([StructuredLogger(path)], valid=0)
    replacing.fit(model, 1)
    assert len({r["run_id"] for r in read(path)}) == 1


@pytest.mark.parametrize("level", ["verbose", "", 10])
def test_unknown_levels_are_refused(level: Any) -> None:
    with pytest.raises(ConfigError, match="level"):
        StructuredLogger(level=level)


def test_only_the_main_process_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from statemachine_loop.callbacks.csv_logger import CSVLogger
    from statemachine_loop.callbacks.progress import ProgressBar
    from statemachine_loop.callbacks.tensorboard import TensorBoardLogger

    monkeypatch.setattr(TrainingLoop, "is_main_process", property(lambda self: False))
    callbacks = [
        ProgressBar(),
        CSVLogger(tmp_path / "log.csv"),
        TensorBoardLogger(tmp_path / "tb"),
        StructuredLogger(tmp_path / "events.jsonl", console=True),
    ]
    loop, model = make_loop(callbacks)
    loop.fit(model, 2)
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")

"""EarlyStopping, TerminateOnNaN and StopAfter: their decisions, traces and whole fits."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from control_helpers import batches, decisions, make_loop, model, params

from statemachine_loop import Callback, ConfigError, DecisionKind, Event, TrainingLoop
from statemachine_loop.callbacks.early_stopping import EarlyStopping
from statemachine_loop.callbacks.gradients import GradientAccumulation
from statemachine_loop.callbacks.guards import StopAfter, TerminateOnNaN
from statemachine_loop.testing import TraceRecorder

E = Event
ENGINES = ("compiled", "transitions")


def train_batch() -> list[Event]:
    return [E.BATCH_START, E.UPDATE_START, E.BATCH_END]


def val_batch() -> list[Event]:
    return [E.BATCH_START, E.INFERENCE_PREDICTION_END, E.BATCH_END]


def epoch(train: list[Event], val: int) -> list[Event]:
    validation = [E.VALIDATION_START, *val_batch() * val, E.VALIDATION_END] if val else []
    return [E.EPOCH_START, E.TRAINING_START, *train, E.TRAINING_END, *validation, E.EPOCH_END]


class Scripted:
    """A metric ``score`` whose value in the n-th epoch (both phases) is ``values[n]``."""

    name = "score"

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.phases = -1

    def reset(self) -> None:
        self.phases += 1

    def update(self, output: Any, target: Any, loss: Any, batch_size: int) -> None:
        pass

    def compute(self) -> float:
        return self.values[max(self.phases, 0) // 2]


class EpochWeights(Callback):
    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def on_epoch_end(self, loop: TrainingLoop) -> None:
        assert loop.model is not None
        self.weights.append(params(loop.model))


def scripted_fit(
    values: list[float], epochs: int, **options: Any
) -> tuple[TrainingLoop, EpochWeights, torch.nn.Module, TraceRecorder]:
    net, weights, recorder = model(), EpochWeights(), TraceRecorder()
    loop = TrainingLoop(
        training=batches(8, 4),
        validation=batches(8, 4, seed=1),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
        loss_fn=torch.nn.functional.mse_loss,
        metrics=[Scripted(values)],
        callbacks=[weights, EarlyStopping("validation/score", **options), recorder],
    )
    loop.fit(net, epochs)
    return loop, weights, net, recorder


# -- EarlyStopping -------------------------------------------------------------------------


def test_early_stopping_stops_after_patience_and_restores_the_best_weights() -> None:
    loop, weights, net, recorder = scripted_fit([1.0, 0.8, 0.85, 0.9, 0.95, 0.7], 6, patience=2)
    (stop,) = decisions(loop, "EarlyStopping")
    assert (stop.event, stop.kind, stop.epoch_index) == (E.EPOCH_END, DecisionKind.STOP, 3)
    assert stop.applied and stop.from_observer
    assert loop.stop_reason == stop.reason
    assert "validation/score did not improve on its best 0.8 (epoch 1)" in stop.reason
    assert "for 2 epoch(s) (patience 2); epoch 3 gave 0.9" in stop.reason
    assert recorder.events == [E.FIT_START, *epoch(train_batch() * 2, 2) * 4, E.FIT_END]
    assert all(torch.equal(a, b) for a, b in zip(params(net), weights.weights[1], strict=True))
    assert not torch.equal(weights.weights[3][0], weights.weights[1][0])


def test_early_stopping_mode_max_and_min_delta() -> None:
    stopping = {"mode": "max", "min_delta": 0.05, "patience": 2}
    loop, *_ = scripted_fit([0.5, 0.6, 0.62, 0.64, 0.9], 5, **stopping)
    (stop,) = decisions(loop, "EarlyStopping")
    assert stop.epoch_index == 3
    assert "best 0.6 (epoch 1) by more than min_delta=0.05" in stop.reason


def test_early_stopping_never_stops_after_the_last_epoch() -> None:
    loop, weights, net, _ = scripted_fit([1.0, 0.5, 0.9], 3, patience=0)
    assert decisions(loop, "EarlyStopping") == [] and loop.stop_reason is None
    assert all(torch.equal(a, b) for a, b in zip(params(net), weights.weights[1], strict=True))


def test_nan_never_improves() -> None:
    loop, *_ = scripted_fit([1.0, math.nan, math.nan], 3, patience=1)
    (stop,) = decisions(loop, "EarlyStopping")
    assert stop.epoch_index == 1 and "gave nan" in stop.reason


def test_restore_best_false_keeps_the_last_weights() -> None:
    _, weights, net, _ = scripted_fit([1.0, 0.5, 0.9], 3, restore_best=False)
    assert all(torch.equal(a, b) for a, b in zip(params(net), weights.weights[2], strict=True))


def test_early_stopping_on_the_real_validation_loss() -> None:
    net, recorder = model(), TraceRecorder()
    early = EarlyStopping(patience=2)
    loop = make_loop(
        net, batches(16, 4), validation=batches(8, 4, seed=1), callbacks=[early, recorder], lr=0.0
    )
    history = loop.fit(net, 10)  # lr 0: the loss never improves after epoch 0
    assert len(history.validation) == 3 and early.best_epoch == 0
    assert loop.stop_reason is not None and "validation/loss" in loop.stop_reason
    assert recorder.events[-2:] == [E.EPOCH_END, E.FIT_END]


def test_an_unknown_metric_is_refused_before_anything_runs() -> None:
    net, recorder = model(), TraceRecorder()
    loop = make_loop(
        net, batches(8, 4), validation=batches(8, 4), callbacks=[EarlyStopping("validation/acc")]
    )
    with pytest.raises(ConfigError, match="monitors that exist are 'training/loss', 'valid"):
        loop.fit(net, 2, callbacks=[recorder])
    assert recorder.events == []


def test_monitoring_validation_without_validation_data_is_an_error() -> None:
    net = model()
    loop = make_loop(net, batches(8, 4), callbacks=[EarlyStopping()])
    with pytest.raises(ConfigError, match="has no validation data"):
        loop.fit(net, 2)
    history = make_loop(net, batches(8, 4), callbacks=[EarlyStopping("training/loss")]).fit(net, 2)
    assert len(history.training) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": "loss"}, "monitor must be 'training/<metric>'"),
        ({"monitor": "test/loss"}, "monitor must be"),
        ({"mode": "lowest"}, "mode must be 'min' or 'max'"),
        ({"patience": -1}, "patience must be an int >= 0"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"min_delta": math.nan}, "min_delta must be a finite number >= 0"),
    ],
)
def test_early_stopping_configuration_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EarlyStopping(**kwargs)


def test_early_stopping_state_dict_round_trips() -> None:
    net = model()
    early = EarlyStopping(patience=5)
    make_loop(net, batches(8, 4), validation=batches(8, 4, seed=1), callbacks=[early]).fit(net, 3)
    state = early.state_dict()
    assert set(state) == {
        "best",
        "best_epoch",
        "wait",
        "best_weights",
        "complete_epoch",
        "validation_proposed",
    }
    fresh = EarlyStopping(patience=5)
    fresh.load_state_dict(state)
    restored = fresh.state_dict()
    assert (restored["best"], restored["best_epoch"], restored["wait"]) == (
        early.best,
        early.best_epoch,
        early.wait,
    )
    for key, tensor in state["best_weights"].items():
        assert torch.equal(restored["best_weights"][key], tensor)
    make_loop(net, batches(8, 4), validation=batches(8, 4, seed=1), callbacks=[fresh]).fit(net, 1)
    assert fresh.best_epoch == 0  # a fit that does not resume starts counting afresh


# -- TerminateOnNaN --------------------------------------------------------------------


def poisoned(batch: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Five batches of four samples; batch ``batch`` has a nan input."""
    data = [(x.clone(), y) for x, y in batches(20, 4)]
    data[batch][0][0, 0] = math.nan
    return data


@pytest.mark.parametrize("engine", ENGINES)
def test_terminate_on_nan_vetoes_the_update_then_stops_at_the_batch_end(engine: str) -> None:
    net, recorder = model(), TraceRecorder()
    loop = make_loop(
        net,
        poisoned(),
        validation=batches(8, 4),
        callbacks=[TerminateOnNaN(), recorder],
        engine=engine,
    )
    history = loop.fit(net, 3)
    veto, stop = decisions(loop, "TerminateOnNaN")
    assert (veto.event, veto.kind, veto.batch_index) == (E.UPDATE_START, DecisionKind.VETO, 2)
    assert veto.reason.startswith("TerminateOnNaN: non-finite loss nan at epoch 0, batch 2")
    assert (stop.event, stop.kind, stop.applied) == (E.BATCH_END, DecisionKind.STOP, True)
    assert loop.stop_reason == "TerminateOnNaN: non-finite loss nan at epoch 0, batch 2"
    trace = [E.EPOCH_START, E.TRAINING_START, *train_batch() * 2, E.BATCH_START, E.BATCH_END]
    assert recorder.events == [E.FIT_START, *trace, E.TRAINING_END, E.EPOCH_END, E.FIT_END]
    assert math.isnan(history.training[-1]["loss"])  # the nan is not hidden from the logs
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_terminate_on_nan_skip_drops_the_update_and_goes_on() -> None:
    net, reference = model(), model()
    nan = TerminateOnNaN("skip")
    loop = make_loop(net, poisoned(), callbacks=[nan])
    history = loop.fit(net, 3)
    assert nan.skipped == 3 and loop.stop_reason is None
    skips = decisions(loop, "TerminateOnNaN")
    assert [(d.kind, d.epoch_index, d.batch_index) for d in skips] == [
        (DecisionKind.VETO, e, 2) for e in range(3)
    ]
    assert skips[0].reason.endswith("update skipped and its gradients dropped")
    assert all(math.isnan(entry["loss"]) for entry in history.training)
    clean = [batch for index, batch in enumerate(poisoned()) if index != 2]
    make_loop(reference, clean).fit(reference, 3)
    for ours, theirs in zip(params(net), params(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_terminate_on_nan_skip_keeps_accumulated_groups_finite() -> None:
    net = model()
    callbacks = [GradientAccumulation(2), TerminateOnNaN("skip")]
    loop = make_loop(net, poisoned(batch=2), callbacks=callbacks)
    loop.fit(net, 2)
    skips = [d for d in decisions(loop, "TerminateOnNaN") if d.kind is DecisionKind.VETO]
    assert [(d.epoch_index, d.batch_index) for d in skips] == [(0, 2), (1, 2)]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_terminate_on_nan_catches_inf_and_refuses_bad_actions() -> None:
    def inf_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(output, target) * math.inf

    net = model()
    loop = make_loop(net, batches(8, 4), callbacks=[TerminateOnNaN()], loss_fn=inf_loss)
    loop.fit(net, 1)
    assert loop.stop_reason == "TerminateOnNaN: non-finite loss inf at epoch 0, batch 0"
    with pytest.raises(ConfigError, match="action must be 'stop' or 'skip'"):
        TerminateOnNaN("ignore")  # type: ignore[arg-type]


# -- StopAfter ---------------------------------------------------------------------------


def stop_after_fit(
    stop: StopAfter, epochs: int = 3, callbacks: tuple[Any, ...] = (), engine: str = "compiled"
) -> tuple[TrainingLoop, TraceRecorder]:
    net, recorder = model(), TraceRecorder()
    loop = make_loop(
        net,
        batches(20, 4),
        validation=batches(8, 4, seed=1),
        callbacks=[*callbacks, stop, recorder],
        engine=engine,
    )
    loop.fit(net, epochs)
    return loop, recorder


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_after_steps_closes_training_runs_validation_then_stops(engine: str) -> None:
    loop, recorder = stop_after_fit(StopAfter(steps=7), engine=engine)
    redirect, stop = decisions(loop, "StopAfter")
    assert (redirect.event, redirect.kind, redirect.target) == (
        E.BATCH_START,
        DecisionKind.REDIRECT,
        E.TRAINING_END,
    )
    assert (redirect.epoch_index, redirect.batch_index) == (1, 2)
    assert (stop.event, stop.kind, stop.epoch_index) == (E.EPOCH_END, DecisionKind.STOP, 1)
    assert loop.stop_reason == (
        "StopAfter: 7 optimizer steps taken (limit 7); stopping at the end of epoch 1"
    )
    expected = [E.FIT_START, *epoch(train_batch() * 5, 2), *epoch(train_batch() * 2, 2), E.FIT_END]
    assert recorder.events == expected
    assert [entry["epoch"] for entry in loop.history.validation] == [0, 1]


def test_stop_after_a_limit_reached_at_an_epoch_end() -> None:
    loop, recorder = stop_after_fit(StopAfter(steps=5))
    (stop,) = decisions(loop, "StopAfter")
    assert (stop.event, stop.epoch_index) == (E.EPOCH_END, 0)
    assert recorder.events == [E.FIT_START, *epoch(train_batch() * 5, 2), E.FIT_END]
    loop, _ = stop_after_fit(StopAfter(steps=15))  # reached at the very end: nothing to stop
    assert loop.decisions == [] and loop.stop_reason is None


def test_stop_after_counts_taken_updates_only() -> None:
    loop, recorder = stop_after_fit(StopAfter(steps=2), callbacks=(GradientAccumulation(2),))
    redirect = next(d for d in decisions(loop, "StopAfter") if d.kind is DecisionKind.REDIRECT)
    assert redirect.batch_index == 4  # batches 0-3 made two updates
    assert recorder.events.count(E.UPDATE_START) == 2


def test_stop_after_seconds_with_a_clock() -> None:
    class Clock:
        now = 100.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()

    class Tick(Callback):
        def on_batch_end(self, loop: TrainingLoop) -> None:
            if loop.is_training:
                clock.now += 1.0

    stop = StopAfter(seconds=3.5, clock=clock)
    loop, _ = stop_after_fit(stop, callbacks=(Tick(),))
    redirect, _ = decisions(loop, "StopAfter")
    assert (redirect.epoch_index, redirect.batch_index) == (0, 4)
    assert (
        loop.stop_reason == "StopAfter: 4 s elapsed (limit 3.5 s); stopping at the end of epoch 0"
    )
    assert stop.state_dict() == {"steps_taken": 0, "elapsed": 4.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs steps=..., seconds=... or both"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"seconds": -1.0}, "seconds must be a positive number"),
        ({"seconds": math.inf}, "seconds must be a positive number"),
    ],
)
def test_stop_after_configuration_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StopAfter(**kwargs)


def test_stop_after_state_dict_round_trips() -> None:
    stop = StopAfter(steps=100)
    stop_after_fit(stop)
    assert stop.state_dict()["steps_taken"] == 15
    other = StopAfter(steps=100)
    other.load_state_dict(stop.state_dict())
    assert other.steps_taken == 15 and other.elapsed == stop.elapsed

"""The driver's plain training loop equals the general one, event for event and bit for bit.

When no callback hooks ``batch_start`` or ``update_start`` (and the step is the
default one), the compiled engine lets the driver move the machine itself through
a training batch instead of proposing those events. The reference engine never
does. These tests run the same fits on both and require the same observable
lifecycle — the phase-level events with the state, previous state and indices the
hooks saw, ``batch_end`` where something hooks it, the wind-down after an exception
from the model, the loss, the optimizer or the data — plus equal ``History`` and
bit-identical parameters. A spy checks that the compiled runs really take the
plain loop, so the comparison cannot quietly test the general loop twice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import helpers as h
import pytest
import torch

from statemachine_loop import Callback, ConfigError, Event, Stop, TrainingLoop
from statemachine_loop.driver import Driver
from statemachine_loop.step import Step

PHASE_EVENTS = [
    e for e in Event if e not in (Event.BATCH_START, Event.UPDATE_START, Event.BATCH_END)
]


class Boom(Exception):  # noqa: N818 - a test's own exception
    pass


class PhaseRecorder(Callback):
    """Observes every event except the per-batch ones (and ``batch_end`` when asked)."""

    def __init__(self, *, batch_end: bool = False, stop_at: int | None = None) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.stop_at = stop_at
        for event in PHASE_EVENTS:
            setattr(self, f"on_{event.value}", self._recorder(event))
        if batch_end:
            self.on_batch_end = self._batch_end

    def _snapshot(self, loop: TrainingLoop, event: Event) -> tuple[Any, ...]:
        loss = loop.last_step_loss
        return (
            event,
            loop.state,
            loop.previous_state,
            loop.epoch_index,
            loop.batch_index,
            loop.batch_count,
            loop.is_training,
            None if loss is None else loss.item(),
            loop.failure is not None,
            loop.stop_reason,
        )

    def _recorder(self, event: Event) -> Any:
        def observe(loop: TrainingLoop) -> None:
            self.seen.append(self._snapshot(loop, event))

        return observe

    def _batch_end(self, loop: TrainingLoop) -> Stop | None:
        self.seen.append(self._snapshot(loop, Event.BATCH_END))
        ends = sum(1 for entry in self.seen if entry[0] is Event.BATCH_END)
        if self.stop_at is not None and ends >= self.stop_at:
            return Stop("enough")
        return None


@pytest.fixture
def plain_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the phases the plain loop runs."""
    calls: list[int] = []
    original = Driver._run_plain_training

    def spy(self: Driver, *args: Any) -> None:
        calls.append(1)
        original(self, *args)

    monkeypatch.setattr(Driver, "_run_plain_training", spy)
    return calls


Run = tuple[TrainingLoop, PhaseRecorder, Any, BaseException | None]


def run(engine: str, **options: Any) -> Run:
    recorder = PhaseRecorder(
        batch_end=options.pop("batch_end", False), stop_at=options.pop("stop_at", None)
    )
    model = options.pop("model", None) or h.make_model()
    epochs = options.pop("epochs", 2)
    callbacks = [recorder, *options.pop("extra", [])]
    loop = h.make_loop(engine, model, callbacks=callbacks, progress=False, **options)
    failure: BaseException | None = None
    try:
        loop.fit(model, epochs)
    except Exception as error:  # compared across engines by assert_same
        failure = error
    return loop, recorder, model, failure


def assert_same(**options: Any) -> tuple[TrainingLoop, PhaseRecorder]:
    compiled = run("compiled", **copy.deepcopy(options))
    reference = run("transitions", **copy.deepcopy(options))
    (c_loop, c_rec, c_model, c_fail), (r_loop, r_rec, r_model, r_fail) = compiled, reference
    assert c_rec.seen == r_rec.seen
    assert c_loop.history.training == r_loop.history.training
    assert c_loop.history.validation == r_loop.history.validation
    assert h.same_tensors(h.params_of(c_model), h.params_of(r_model))
    assert (type(c_fail), str(c_fail)) == (type(r_fail), str(r_fail))
    assert c_loop.state == r_loop.state == "done"
    assert c_loop.stop_reason == r_loop.stop_reason
    assert [h.record_tuple(r) for r in c_loop.decisions] == [
        h.record_tuple(r) for r in r_loop.decisions
    ]
    return c_loop, c_rec


@pytest.mark.parametrize("val", [0, 3])
@pytest.mark.parametrize("batch_end", [False, True])
def test_plain_fit_equals_the_reference(plain_calls: list[int], val: int, batch_end: bool) -> None:
    loop, recorder = assert_same(train=4, val=val, batch_end=batch_end)
    assert len(plain_calls) == 2  # one training phase per epoch, on the compiled engine only
    assert len(loop.history.training) == 2
    assert recorder.seen[-1][0] is Event.FIT_END
    if batch_end:
        ends = [entry for entry in recorder.seen if entry[0] is Event.BATCH_END]
        assert len(ends) == 2 * (4 + val)
        assert ends[0][1:3] == ("training", "updating")


def test_stop_from_a_batch_end_observer(plain_calls: list[int]) -> None:
    loop, recorder = assert_same(train=5, batch_end=True, stop_at=3)
    assert [entry[0] for entry in recorder.seen].count(Event.BATCH_END) == 3
    assert plain_calls == [1]
    assert loop.stop_reason == "enough"
    assert loop.history.training[0]["epoch"] == 0


class BatchEndHooks(Callback):
    """A batch_end guard or observer that acts at the training batch ``at`` of epoch 0."""

    def __init__(self, kind: str, at: int) -> None:
        self.at = at
        if kind == "guard":
            self.guard_batch_end = self._stop
        else:
            self.on_batch_end = self._raise

    def _now(self, loop: TrainingLoop) -> bool:
        return loop.is_training and loop.epoch_index == 0 and loop.batch_index == self.at

    def _stop(self, loop: TrainingLoop) -> Stop | None:
        return Stop("guarded") if self._now(loop) else None

    def _raise(self, loop: TrainingLoop) -> None:
        if self._now(loop) and loop.failure is None:
            raise Boom("observer")


@pytest.mark.parametrize("kind", ["guard", "observer"])
def test_batch_end_guards_and_raising_observers_act_the_same(
    plain_calls: list[int], kind: str
) -> None:
    # A guard makes the plain loop propose batch_end; an observer alone is called directly.
    hooks = BatchEndHooks(kind, at=2)
    loop, recorder = assert_same(train=4, val=2, batch_end=True, extra=[hooks])
    assert plain_calls == [1]
    ends = [entry for entry in recorder.seen if entry[0] is Event.BATCH_END]
    assert len(ends) == 3  # batches 0, 1 and 2: the guard's stop takes the end, then winds down
    if kind == "guard":
        assert loop.stop_reason == "guarded"
    else:
        assert isinstance(loop.failure, Boom)


@pytest.mark.parametrize("at", [0, 2])
@pytest.mark.parametrize("where", ["model", "loss", "optimizer", "data"])
def test_exceptions_wind_down_the_same(plain_calls: list[int], where: str, at: int) -> None:
    error = Boom(where)
    options: dict[str, Any] = {"train": 4, "val": 2, "batch_end": True}
    if where == "model":
        options["model"] = h.CountingLinear(raise_at=at, exc=error)
    elif where == "loss":
        options["loss_fn"] = h.CountingLoss(raise_at=at, exc=error)
    elif where == "data":
        options["training"] = _FailingData(h.loader(4, seed=1), at, error)
    loop, recorder = assert_same(**options) if where != "optimizer" else _optimizer_case(at)
    assert plain_calls == [1]
    assert isinstance(loop.failure, Boom)
    # The wind-down starts where the failure left the machine.
    wind_down = [(entry[0], entry[2]) for entry in recorder.seen if entry[-2]]
    first = {
        "model": [(Event.BATCH_END, "training_batch")],
        "loss": [(Event.BATCH_END, "training_batch")],
        "optimizer": [(Event.BATCH_END, "updating")],
        "data": [],
    }[where]
    assert wind_down == [
        *first,
        (Event.TRAINING_END, "training"),
        (Event.EPOCH_END, "trained"),
        (Event.FIT_END, "fit"),
    ]


def _optimizer_case(at: int) -> tuple[TrainingLoop, PhaseRecorder]:
    results = []
    for engine in ("compiled", "transitions"):
        model = h.make_model()
        optimizer = _FailingSGD(model.parameters(), at=at)
        recorder = PhaseRecorder(batch_end=True)
        loop = TrainingLoop(
            training=h.loader(4, seed=1),
            optimizer=optimizer,
            loss_fn=torch.nn.functional.mse_loss,
            callbacks=[recorder],
            engine=engine,  # type: ignore[arg-type]
            progress=False,
        )
        with pytest.raises(Boom):
            loop.fit(model, 2)
        results.append((loop, recorder, model))
    (c_loop, c_rec, c_model), (_, r_rec, r_model) = results
    assert c_rec.seen == r_rec.seen
    # The failing step raised before touching the parameters, in both runs.
    assert h.same_tensors(h.params_of(c_model), h.params_of(r_model))
    return c_loop, c_rec


class _FailingSGD(torch.optim.SGD):
    def __init__(self, params: Any, at: int) -> None:
        super().__init__(params, lr=0.1)
        self.calls, self.at = 0, at

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        index, self.calls = self.calls, self.calls + 1
        if index == self.at:
            raise Boom("optimizer")
        return super().step(closure)


class _FailingData:
    """Yields the loader's batches, raising on the ``at``-th fetch of the first pass."""

    def __init__(self, data: Any, at: int, error: BaseException) -> None:
        self.data, self.at, self.error = data, at, error

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.data):
            if index == self.at:
                raise self.error
            yield batch


def test_bad_loss_and_bad_batch_say_what_is_wrong(plain_calls: list[int]) -> None:
    model = h.make_model()
    loop = h.make_loop("compiled", model, loss_fn=lambda out, tgt: (out - tgt) ** 2, progress=False)
    with pytest.raises(ConfigError, match="scalar tensor"):
        loop.fit(model, 1)
    triples = [(x, y, y) for x, y in h.loader(2, seed=1)]
    loop = h.make_loop("compiled", model, training=triples, progress=False)
    with pytest.raises(ConfigError, match=r"\(input, target\) pair"):
        loop.fit(model, 1)
    assert len(plain_calls) == 2


def test_hooked_batches_and_custom_steps_take_the_general_loop(plain_calls: list[int]) -> None:
    class Watch(Callback):
        def guard_update_start(self, loop: TrainingLoop) -> None:
            return None

    class Doubled(Step):
        def batch_size(self, inputs: Any, target: Any) -> int:
            return 2 * len(target)

    model = h.make_model()
    h.make_loop("compiled", model, callbacks=[Watch()], progress=False).fit(model, 1)
    h.make_loop("compiled", model, step=Doubled(), progress=False).fit(model, 1)
    h.make_loop("transitions", model, progress=False).fit(model, 1)
    assert plain_calls == []


def test_the_last_graph_is_not_kept_after_the_phase() -> None:
    """The plain loop keeps the previous loss only until the next one replaces it."""
    model = h.make_model()
    loop = h.make_loop("compiled", model, train=3, progress=False)
    loop.fit(model, 1)
    assert loop.last_step_loss is not None and loop.last_step_loss.ndim == 0
    assert loop.last_step_output is not None
    assert not any(name.startswith("_previous") for name in vars(loop))

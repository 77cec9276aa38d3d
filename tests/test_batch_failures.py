"""Both engines run a batch alike, event for event and bit for bit, whatever fails where.

The same fits run on the compiled engine and on the reference ``transitions`` engine,
and must show the same observable lifecycle — the phase-level events with the state,
previous state and indices the hooks saw, ``batch_end`` where something hooks it, the
wind-down after an exception from the model, the loss, the optimizer, a metric or the
data at every point of a batch — plus equal ``History`` and bit-identical parameters.
The recorder snapshots everything a hook can read (``last_step_*``, ``batches_run``,
whether ``state_dict()`` is legal there), so the comparison covers the run state the
driver keeps, not just the trace.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import helpers as h
import pytest
import torch

from statemachine_loop import (
    Callback,
    ConfigError,
    Event,
    LifecycleError,
    Stop,
    TrainingLoop,
    Veto,
)

PHASE_EVENTS = [
    e for e in Event if e not in (Event.BATCH_START, Event.UPDATE_START, Event.BATCH_END)
]


class Boom(Exception):  # noqa: N818 - a test's own exception
    pass


class PhaseRecorder(Callback):
    """Observes every event except the per-batch ones (and ``batch_end`` when asked).

    ``batch_end="guard"`` also records in a guard of ``batch_end``, which sees the
    state a batch left before the proposal moves the machine.
    """

    def __init__(self, *, batch_end: bool | str = False, stop_at: int | None = None) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.stop_at = stop_at
        for event in PHASE_EVENTS:
            setattr(self, f"on_{event.value}", self._recorder(event))
        # A guard sees the state a batch left before the phase end moves the machine.
        self.guard_training_end = self._recorder("guard_training_end")
        if batch_end:
            self.on_batch_end = self._batch_end
        if batch_end == "guard":
            self.guard_batch_end = self._recorder("guard_batch_end")

    def _snapshot(self, loop: TrainingLoop, event: Event | str) -> tuple[Any, ...]:
        return (
            event,
            loop.state,
            loop.previous_state,
            loop.epoch_index,
            loop.batch_index,
            loop.batch_count,
            loop.batches_run,
            loop.is_training,
            *(
                _value(value)
                for value in (
                    loop.last_step_input,
                    loop.last_step_target,
                    loop.last_step_output,
                    loop.last_step_loss,
                )
            ),
            _exact(loop),
            loop.failure is not None,
            loop.stop_reason,
        )

    def _recorder(self, event: Event | str) -> Any:
        def observe(loop: TrainingLoop) -> None:
            self.seen.append(self._snapshot(loop, event))

        return observe

    def _batch_end(self, loop: TrainingLoop) -> Stop | None:
        self.seen.append(self._snapshot(loop, Event.BATCH_END))
        ends = sum(1 for entry in self.seen if entry[0] is Event.BATCH_END)
        if self.stop_at is not None and ends >= self.stop_at:
            return Stop("enough")
        return None


def _value(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _exact(loop: TrainingLoop) -> Any:
    """A checkpoint's position here, or that ``state_dict()`` refuses (mid-batch)."""
    try:
        payload = loop.state_dict()
    except LifecycleError:
        return "mid-batch"
    return payload["position"], payload.get("phase", {}).get("ran")


Run = tuple[TrainingLoop, PhaseRecorder, Any, BaseException | None]


def run(engine: str, **options: Any) -> Run:
    optimizer = options.pop("optimizer", None)
    recorder = PhaseRecorder(
        batch_end=options.pop("batch_end", False), stop_at=options.pop("stop_at", None)
    )
    model = options.pop("model", None) or h.make_model()
    epochs = options.pop("epochs", 2)
    callbacks = [recorder, *options.pop("extra", [])]
    loop = h.make_loop(engine, model, callbacks=callbacks, progress=False, **options)
    if optimizer is not None:  # the loop's own SGD, swapped before anything ran
        loop.optimizer = optimizer(model.parameters())
    failure: BaseException | None = None
    try:
        loop.fit(model, epochs)
    except (Exception, KeyboardInterrupt) as error:  # compared across engines by assert_same
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
def test_a_fit_equals_the_reference(val: int, batch_end: bool) -> None:
    loop, recorder = assert_same(train=4, val=val, batch_end=batch_end)
    assert len(loop.history.training) == 2
    assert recorder.seen[-1][0] is Event.FIT_END
    if batch_end:
        ends = [entry for entry in recorder.seen if entry[0] is Event.BATCH_END]
        assert len(ends) == 2 * (4 + val)
        assert ends[0][1:3] == ("training", "updating")


def test_stop_from_a_batch_end_observer() -> None:
    loop, recorder = assert_same(train=5, batch_end=True, stop_at=3)
    assert [entry[0] for entry in recorder.seen].count(Event.BATCH_END) == 3
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


@pytest.mark.parametrize("recorded", [True, False], ids=["with_recorder", "alone"])
@pytest.mark.parametrize("kind", ["guard", "observer"])
def test_batch_end_guards_and_raising_observers_act_the_same(kind: str, recorded: bool) -> None:
    hooks = BatchEndHooks(kind, at=2)
    loop, recorder = assert_same(train=4, val=2, batch_end=recorded, extra=[hooks])
    ends = [entry for entry in recorder.seen if entry[0] is Event.BATCH_END]
    # Batches 0, 1 and 2: the guard's stop takes the end, then winds down.
    assert len(ends) == (3 if recorded else 0)
    assert recorder.seen[-1][0] is Event.FIT_END
    if kind == "guard":
        assert loop.stop_reason == "guarded"
    else:
        assert isinstance(loop.failure, Boom)


#: Where a batch can fail, and the state its wind-down starts from (``batch_end`` from
#: there, or nothing when the batch never started).
FAILURES = {
    "data": None,  # the fetch of batch ``at``
    "later data": None,  # the fetch of batch ``at`` in the second epoch
    "split": None,  # batch ``at`` is not an (input, target) pair
    "model": "training_batch",
    "interrupt": "training_batch",  # KeyboardInterrupt from the model
    "loss": "training_batch",
    "scalar": "training_batch",  # the loss is not a scalar
    "optimizer": "updating",
    "zero_grad": "updating",
    "metric": "updating",
}


def _failing(where: str, at: int, error: BaseException, batch_end: bool | str) -> dict[str, Any]:
    """Options for ``run`` whose fit raises ``error`` (or a ConfigError) at batch ``at``."""
    options: dict[str, Any] = {"train": 4, "val": 2, "batch_end": batch_end}
    if where in ("model", "interrupt"):
        options["model"] = h.CountingLinear(raise_at=at, exc=error)
    elif where == "loss":
        options["loss_fn"] = h.CountingLoss(raise_at=at, exc=error)
    elif where == "scalar":
        options["loss_fn"] = _NotScalarAt(at)
    elif where in ("data", "later data"):
        options["training"] = _FailingData(h.loader(4, seed=1), at, error, later=where != "data")
    elif where == "split":
        batches = h.batches_of(h.loader(4, seed=1))
        x, y = batches[at]
        options["training"] = [*batches[:at], (x, y, y), *batches[at + 1 :]]
    elif where in ("optimizer", "zero_grad"):
        options["optimizer"] = lambda params: _FailingSGD(params, at, where, error)
    elif where == "metric":
        options["metrics"] = [_FailingMetric(at, error)]
    return options


@pytest.mark.parametrize("batch_end", ["guard", True, False], ids=["guard", "observer", "none"])
@pytest.mark.parametrize("at", [0, 2])
@pytest.mark.parametrize("where", list(FAILURES))
def test_exceptions_wind_down_the_same(where: str, at: int, batch_end: bool | str) -> None:
    error: BaseException = KeyboardInterrupt() if where == "interrupt" else Boom(where)
    loop, recorder = assert_same(**_failing(where, at, error, batch_end))
    expected = ConfigError if where in ("split", "scalar") else type(error)
    assert isinstance(loop.failure, expected)
    # The wind-down starts where the failure left the machine (the recorder sees
    # batch_end only when it hooks it).
    wind_down = [
        (entry[0], entry[2])
        for entry in recorder.seen
        if entry[-2] and isinstance(entry[0], Event)  # observers only
    ]
    state = FAILURES[where]
    assert wind_down == [
        *([] if state is None or not batch_end else [(Event.BATCH_END, state)]),
        (Event.TRAINING_END, "training"),
        (Event.EPOCH_END, "trained"),
        (Event.FIT_END, "fit"),
    ]


class _NotScalarAt(h.CountingLoss):
    """MSE, except that call ``at`` returns the per-sample losses (not a scalar)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.calls == self.at:
            self.calls += 1
            return (output - target) ** 2
        return super().__call__(output, target)


class _FailingSGD(torch.optim.SGD):
    """SGD whose ``at``-th ``step`` (or ``zero_grad`` after it) raises ``error``."""

    def __init__(self, params: Any, at: int, where: str, error: BaseException) -> None:
        super().__init__(params, lr=0.1)
        self.steps, self.at, self.where, self.error = 0, at, where, error

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        index, self.steps = self.steps, self.steps + 1
        if index == self.at and self.where == "optimizer":
            raise self.error
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.steps == self.at + 1 and self.where == "zero_grad":
            raise self.error
        super().zero_grad(set_to_none)


class _FailingMetric(h.CountingMetric):
    """Counts updates, and raises ``error`` on the ``at``-th one."""

    def __init__(self, at: int, error: BaseException) -> None:
        super().__init__()
        self.at, self.error = at, error

    def update(self, output: Any, target: Any, loss: Any, batch_size: int) -> None:
        if self.total == self.at:
            raise self.error
        super().update(output, target, loss, batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]


class _FailingData:
    """Yields the loader's batches, raising on the ``at``-th fetch of the first (or second) pass."""

    def __init__(self, data: Any, at: int, error: BaseException, *, later: bool = False) -> None:
        self.data, self.at, self.error = data, at, error
        self.failing_pass = 1 if later else 0
        self.passes = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Any]:
        this_pass, self.passes = self.passes, self.passes + 1
        for index, batch in enumerate(self.data):
            if index == self.at and this_pass == self.failing_pass:
                raise self.error
            yield batch


def test_bad_loss_and_bad_batch_say_what_is_wrong() -> None:
    model = h.make_model()
    loop = h.make_loop("compiled", model, loss_fn=lambda out, tgt: (out - tgt) ** 2, progress=False)
    with pytest.raises(ConfigError, match="scalar tensor"):
        loop.fit(model, 1)
    triples = [(x, y, y) for x, y in h.loader(2, seed=1)]
    loop = h.make_loop("compiled", model, training=triples, progress=False)
    with pytest.raises(ConfigError, match=r"\(input, target\) pair"):
        loop.fit(model, 1)


def test_scalar_targets_weigh_batches_by_their_inputs() -> None:
    """A 0-d target has no first dimension: ``Step.batch_size`` falls back to the input's."""
    torch.manual_seed(3)
    training = [(torch.randn(n, h.IN_FEATURES), torch.tensor(float(n))) for n in (1, 4, 2)]

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((output - target) ** 2).mean()

    loop, _ = assert_same(training=training, loss_fn=loss_fn, epochs=1)
    model = h.make_model()  # the weights assert_same started from
    losses = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for inputs, target in training:
        loss = loss_fn(model(inputs), target)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss.item(), len(inputs)))
    expected = sum(value * n for value, n in losses) / sum(n for _, n in losses)
    assert loop.history.training[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_the_last_batch_stays_readable_after_the_phase() -> None:
    """After a fit, the last batch's loss and output are what hooks last read."""
    model = h.make_model()
    loop = h.make_loop("compiled", model, train=3, progress=False)
    loop.fit(model, 1)
    assert loop.last_step_loss is not None and loop.last_step_loss.ndim == 0
    assert loop.last_step_output is not None


class _VetoingObserver(Callback):
    """The lone batch_end observer, returning what no observer may return."""

    def on_batch_end(self, loop: TrainingLoop) -> Veto | None:
        return Veto("observers cannot veto") if loop.batch_index == 1 else None


def test_a_lone_observers_bad_result_is_refused_as_the_reference_refuses_it() -> None:
    # What a lone observer returns goes through the policy (LifecycleError naming it).
    loop, _ = assert_same(train=3, extra=[_VetoingObserver()])
    assert isinstance(loop.failure, LifecycleError)
    assert "Observer on_batch_end of _VetoingObserver returned Veto" in str(loop.failure)

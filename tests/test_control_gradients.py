"""GradientAccumulation, GradientClipping and MixedPrecision: decisions and whole fits."""

from __future__ import annotations

import math

import pytest
import torch
from control_helpers import (
    Probe,
    Unsized,
    batches,
    decisions,
    make_loop,
    model,
    params,
    regrouped,
)

from statemachine_loop import Callback, ConfigError, DecisionKind, Event, TrainingLoop
from statemachine_loop.callbacks.gradients import GradientAccumulation, GradientClipping
from statemachine_loop.callbacks.precision import MixedPrecision
from statemachine_loop.testing import TraceRecorder

# -- GradientAccumulation --------------------------------------------------------------


def test_accumulation_vetoes_all_but_every_kth_and_the_last_batch() -> None:
    recorder, net = TraceRecorder(), model()
    loop = make_loop(net, batches(26, 4), callbacks=[GradientAccumulation(3), recorder])
    loop.fit(net, 1)
    vetoes = decisions(loop, "GradientAccumulation")
    assert [(d.batch_index, d.kind, d.applied) for d in vetoes] == [
        (i, DecisionKind.VETO, True) for i in (0, 1, 3, 4)
    ]
    assert vetoes[0].event is Event.UPDATE_START
    assert vetoes[1].reason == "accumulating gradients: batch 2 of 3 in this update"
    taken = [e.batch_index for e in recorder.entries if e.event is Event.UPDATE_START]
    assert taken == [2, 5, 6]  # 7 batches: groups of 3, 3 and the final partial 1


@pytest.mark.parametrize(
    ("steps", "sizes"),
    [
        (4, [16, 10]),  # 7 batches of 4, 4, 4, 4 | 4, 4, 2
        (3, [12, 12, 2]),  # a final partial group of one short batch
        (7, [26]),  # the whole epoch is one update
    ],
)
def test_accumulated_batches_step_like_one_big_batch(steps: int, sizes: list[int]) -> None:
    data = batches(26, 4)  # 7 batches, the last one of 2 samples
    net, reference = model(), model()
    momentum = {"momentum": 0.9}
    loop = make_loop(net, data, callbacks=[GradientAccumulation(steps)], **momentum)
    loop.fit(net, 3)
    big = make_loop(reference, regrouped(data, sizes), **momentum)
    big.fit(reference, 3)
    for ours, theirs in zip(params(net), params(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_vetoed_updates_leave_the_weights_untouched() -> None:
    class Snapshot(Callback):
        def __init__(self) -> None:
            self.seen: list[list[torch.Tensor]] = []

        def on_batch_end(self, loop: TrainingLoop) -> None:
            assert loop.model is not None
            self.seen.append(params(loop.model))

    net, snapshot = model(), Snapshot()
    before = params(net)
    loop = make_loop(net, batches(16, 4), callbacks=[GradientAccumulation(4), snapshot])
    loop.fit(net, 1)
    for vetoed in snapshot.seen[:3]:
        assert all(torch.equal(a, b) for a, b in zip(vetoed, before, strict=True))
    assert not torch.equal(snapshot.seen[3][0], before[0])


def test_unsized_data_warns_that_a_partial_group_is_dropped() -> None:
    net = model()
    data = Unsized(list(batches(20, 4)))  # 5 batches, groups of 2: the fifth is left over
    probe = Probe()
    loop = make_loop(net, data, callbacks=[GradientAccumulation(2), probe])
    with pytest.warns(RuntimeWarning, match="no len.*last 4 samples of epoch 0"):
        loop.fit(net, 1)
    assert [batch for _, batch in probe.updates] == [1, 3]


def test_accumulation_of_one_hooks_nothing_and_bad_steps_are_refused() -> None:
    one = GradientAccumulation(1)
    assert one.guard_update_start is None  # type: ignore[comparison-overlap]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="steps must be an int >= 1"):
            GradientAccumulation(bad)  # type: ignore[arg-type]


# -- GradientClipping -------------------------------------------------------------------


class RawGrads(Callback):
    """A guard that copies the gradients before any observer (the clipping) runs."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def guard_update_start(self, loop: TrainingLoop) -> None:
        assert loop.model is not None
        self.grads.append([p.grad.detach().clone() for p in loop.model.parameters()])


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def test_clipping_by_norm_rescales_the_update_it_observes() -> None:
    net, raw, probe = model(), RawGrads(), Probe()
    clip = GradientClipping(max_norm=0.5)
    loop = make_loop(net, batches(16, 4), callbacks=[raw, clip, probe], lr=0.5)
    loop.fit(net, 2)
    assert loop.decisions == []
    assert len(probe.grads) == len(raw.grads) == 8
    for before, after in zip(raw.grads, probe.grads, strict=True):
        norm = total_norm(before)
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a, b * scale)
        assert float(total_norm(after)) <= 0.5 + 1e-9
    assert any(float(total_norm(g)) > 0.5 for g in raw.grads)  # the limit did bite
    assert clip.last_norm is not None


def test_clipping_by_value_clamps_each_element() -> None:
    net, raw, probe = model(), RawGrads(), Probe()
    loop = make_loop(net, batches(16, 4), callbacks=[raw, GradientClipping(max_value=0.2), probe])
    loop.fit(net, 1)
    for before, after in zip(raw.grads, probe.grads, strict=True):
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a, b.clamp(-0.2, 0.2))


def test_clipping_sees_only_taken_updates_and_their_whole_accumulated_gradient() -> None:
    class CountingClip(GradientClipping):
        calls = 0

        def on_update_start(self, loop: TrainingLoop) -> None:
            self.calls += 1
            super().on_update_start(loop)

    data = batches(16, 4)
    net, clip = model(), CountingClip(max_norm=0.3)
    # clipping listed first: the accumulated gradient is already a mean when it sees it
    loop = make_loop(net, data, callbacks=[clip, GradientAccumulation(2)], lr=0.5)
    loop.fit(net, 2)
    assert clip.calls == 4  # 8 batches, 4 updates

    reference = model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(2):
        for x, y in regrouped(data, [8, 8]):
            torch.nn.functional.mse_loss(reference(x), y).backward()
            torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.3)
            optimizer.step()
            optimizer.zero_grad()
    for ours, theirs in zip(params(net), params(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_clipping_unscales_a_grad_scaler_first() -> None:
    class CpuScaler(Callback):
        def on_fit_start(self, loop: TrainingLoop) -> None:
            loop.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

        def on_fit_end(self, loop: TrainingLoop) -> None:
            loop.grad_scaler = None

    data = batches(16, 4)
    scaled, plain = model(), model()
    make_loop(scaled, data, callbacks=[CpuScaler(), GradientClipping(max_norm=0.3)]).fit(scaled, 2)
    make_loop(plain, data, callbacks=[GradientClipping(max_norm=0.3)]).fit(plain, 2)
    for ours, theirs in zip(params(scaled), params(plain), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of max_norm and max_value"),
        ({"max_norm": 1.0, "max_value": 1.0}, "exactly one of max_norm and max_value"),
        ({"max_norm": 0.0}, "max_norm must be a positive finite number"),
        ({"max_value": math.inf}, "max_value must be a positive finite number"),
    ],
)
def test_clipping_configuration_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GradientClipping(**kwargs)  # type: ignore[arg-type]


# -- MixedPrecision ------------------------------------------------------------------------


class OutputDtype(Callback):
    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_batch_end(self, loop: TrainingLoop) -> None:
        self.dtypes.add(loop.last_step_output.dtype)


def test_bfloat16_on_cpu_trains_under_autocast() -> None:
    net, probe, dtypes = model(dtype=torch.float32), Probe(), OutputDtype()
    data = batches(64, 8, dtype=torch.float32)
    loop = make_loop(
        net,
        data,
        validation=batches(32, 16, seed=1, dtype=torch.float32),
        callbacks=[MixedPrecision(torch.bfloat16), probe, dtypes],
        lr=0.1,
    )
    history = loop.fit(net, 5)
    assert dtypes.dtypes == {torch.bfloat16}  # forward ran in bfloat16, both phases
    assert all(p.dtype == torch.float32 for p in net.parameters())
    losses = [entry["loss"] for entry in history.training]
    assert losses[-1] < 0.5 * losses[0]
    assert history.validation[-1]["loss"] < history.validation[0]["loss"]
    assert loop.autocast is None and loop.grad_scaler is None


def test_float16_off_cuda_is_refused_before_anything_runs() -> None:
    net, recorder = model(dtype=torch.float32), TraceRecorder()
    before = params(net)
    loop = make_loop(
        net, batches(8, 4, dtype=torch.float32), callbacks=[MixedPrecision(torch.float16), recorder]
    )
    with pytest.raises(ConfigError, match=r"float16\) needs a CUDA device.*'cpu'.*bfloat16"):
        loop.fit(net, 1)
    assert recorder.events == []
    assert all(torch.equal(a, b) for a, b in zip(params(net), before, strict=True))
    assert loop.autocast is None


def test_autocast_is_cleared_after_a_failed_fit() -> None:
    class Boom(Callback):
        def on_batch_end(self, loop: TrainingLoop) -> None:
            raise RuntimeError("boom")

    net = model(dtype=torch.float32)
    loop = make_loop(net, batches(8, 4, dtype=torch.float32), callbacks=[MixedPrecision(), Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        loop.fit(net, 1)
    assert loop.autocast is None


def test_mixed_precision_configuration_errors() -> None:
    with pytest.raises(ConfigError, match=r"dtype must be torch\.bfloat16 or torch\.float16"):
        MixedPrecision(torch.float32)
    with pytest.raises(ConfigError, match=r"scaler_options apply only to dtype=torch\.float16"):
        MixedPrecision(torch.bfloat16, scaler_options={"init_scale": 2.0})

    net = model(dtype=torch.float32)
    loop = make_loop(net, batches(8, 4, dtype=torch.float32), callbacks=[MixedPrecision()], lr=0.1)
    loop.autocast = lambda: torch.autocast("cpu")
    with pytest.raises(ConfigError, match="already set"):
        loop.fit(net, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 mixed precision needs CUDA")
def test_float16_on_cuda_scales_gradients_and_trains() -> None:
    net = model(dtype=torch.float32)
    data = batches(256, 32, dtype=torch.float32)
    precision = MixedPrecision(torch.float16, scaler_options={"init_scale": 2.0**10})

    class SeesScaler(Callback):
        scaled = False

        def on_update_start(self, loop: TrainingLoop) -> None:
            self.scaled = loop.grad_scaler is precision.grad_scaler is not None

    sees = SeesScaler()
    loop = make_loop(net, data, callbacks=[precision, GradientClipping(max_norm=1.0), sees])
    history = loop.fit(net, 5, device="cuda")
    assert sees.scaled
    assert history.training[-1]["loss"] < 0.5 * history.training[0]["loss"]
    assert loop.grad_scaler is None
    assert "scale" in precision.state_dict()["grad_scaler"]


def test_all_control_callbacks_together() -> None:
    from statemachine_loop.callbacks.early_stopping import EarlyStopping
    from statemachine_loop.callbacks.guards import StopAfter, TerminateOnNaN
    from statemachine_loop.callbacks.schedule import LearningRateScheduler
    from statemachine_loop.schedules import Schedule, Segment

    net, probe = model(dtype=torch.float32), Probe()
    schedule = Schedule([Segment("linear", start=0, end=0.1, steps=4), Segment("cosine", end=0)])
    callbacks = [
        MixedPrecision(torch.bfloat16),
        GradientAccumulation(2),
        GradientClipping(max_norm=1.0),
        LearningRateScheduler(schedule),
        TerminateOnNaN(),
        EarlyStopping("validation/loss", patience=2),
        StopAfter(steps=14),
        probe,
    ]
    loop = make_loop(
        net,
        batches(64, 8, dtype=torch.float32),  # 8 batches: 4 updates per epoch
        validation=batches(16, 8, seed=1, dtype=torch.float32),
        callbacks=callbacks,
    )
    history = loop.fit(net, 6)
    assert len(probe.lrs) == 14  # StopAfter cut epoch 3 after two of its four updates
    assert probe.lrs[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1], rel=1e-6)
    assert loop.stop_reason is not None and loop.stop_reason.startswith("StopAfter: 14")
    assert history.validation[-1]["loss"] < history.validation[0]["loss"]
    kinds = {(d.callback, d.kind) for d in loop.decisions}
    assert kinds == {
        ("GradientAccumulation", DecisionKind.VETO),
        ("StopAfter", DecisionKind.REDIRECT),
        ("StopAfter", DecisionKind.STOP),
    }

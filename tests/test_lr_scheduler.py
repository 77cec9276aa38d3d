"""LearningRateScheduler in whole fits, step for step against torch's schedulers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from control_helpers import Probe, Unsized, batches, make_loop, model, params
from torch.optim import lr_scheduler

from statemachine_loop import ConfigError
from statemachine_loop.callbacks.gradients import GradientAccumulation
from statemachine_loop.callbacks.schedule import LearningRateScheduler
from statemachine_loop.schedules import Schedule, Segment, adam_bias_correction

PEAK = 0.1
MakeScheduler = Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler]


def warmup() -> Schedule:
    return Schedule([Segment("linear", start=0, end=PEAK, steps=10), Segment("linear", end=0)])


def torch_fit(
    epochs: int, make: MakeScheduler, base: float
) -> tuple[list[float], list[torch.Tensor]]:
    """The hand-written loop with a torch scheduler stepped after every optimizer step."""
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=base)
    scheduler = make(optimizer)
    rates = []
    for _ in range(epochs):
        for x, y in batches(20, 4):
            rates.append(optimizer.param_groups[0]["lr"])
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    return rates, params(net)


def our_fit(
    epochs: int, scheduler: LearningRateScheduler
) -> tuple[list[float], list[torch.Tensor]]:
    net, probe = model(), Probe()
    loop = make_loop(net, batches(20, 4), callbacks=[scheduler, probe], lr=123.0)
    loop.fit(net, epochs)
    assert loop.decisions == []
    return probe.lrs, params(net)


def assert_same_fit(ours: tuple[list[float], list[torch.Tensor]], theirs: object) -> None:
    our_rates, our_params = ours
    their_rates, their_params = theirs  # type: ignore[misc]
    assert our_rates == pytest.approx(their_rates, rel=1e-12, abs=1e-15)
    for a, b in zip(our_params, their_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_warmup_then_linear_decay_equals_lambda_lr_in_a_fit() -> None:
    epochs, total = 4, 20  # 5 batches per epoch; the schedule fills 20 steps (0..19)
    warm, last = 9, total - 1

    def factor(step: int) -> float:
        return step / warm if step < warm else max(0.0, (last - step) / (last - warm))

    theirs = torch_fit(epochs, lambda opt: lr_scheduler.LambdaLR(opt, factor), PEAK)
    ours = our_fit(epochs, LearningRateScheduler(warmup()))
    assert ours[0][9] == pytest.approx(PEAK) and ours[0][-1] == 0.0
    assert_same_fit(ours, theirs)


def test_linear_decay_equals_linear_lr_in_a_fit() -> None:
    base = 0.2
    schedule = Schedule(
        [
            Segment("linear", start=base, end=0.1 * base, steps=8),
            Segment("constant", end=0.1 * base),
        ]
    )
    theirs = torch_fit(3, lambda opt: lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=7), base)
    assert_same_fit(our_fit(3, LearningRateScheduler(schedule)), theirs)


def test_cosine_equals_cosine_annealing_lr_in_a_fit() -> None:
    base, eta_min = 0.2, 0.001
    schedule = Schedule([Segment("cosine", start=base, end=eta_min)])
    theirs = torch_fit(
        3, lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=14, eta_min=eta_min), base
    )
    assert_same_fit(our_fit(3, LearningRateScheduler(schedule)), theirs)


def test_a_step_is_a_group_of_accumulated_batches() -> None:
    net, probe = model(), Probe()
    data = batches(28, 4)  # 7 batches: steps of 2, 2, 2, 1 batches
    schedule = warmup()
    loop = make_loop(
        net, data, callbacks=[GradientAccumulation(2), LearningRateScheduler(schedule), probe]
    )
    loop.fit(net, 3)
    assert probe.lrs == pytest.approx(schedule.with_total_steps(12).values())

    # given to fit() only, the accumulation is not visible to the scheduler: pass it
    net, probe = model(), Probe()
    loop = make_loop(net, data, callbacks=[LearningRateScheduler(schedule, accumulation=2), probe])
    loop.fit(net, 3, callbacks=[GradientAccumulation(2)])
    assert probe.lrs == pytest.approx(schedule.with_total_steps(12).values())


def test_per_epoch_sets_the_epoch_rate() -> None:
    net, probe = model(), Probe()
    schedule = Schedule([Segment("exponential", start=0.1, end=0.1 * 0.5**3)])
    loop = make_loop(
        net, batches(12, 4), callbacks=[LearningRateScheduler(schedule, per="epoch"), probe]
    )
    loop.fit(net, 4)
    assert probe.lrs == pytest.approx([0.1 * 0.5**e for e in range(4) for _ in range(3)])


def test_bias_correction_multiplies_the_rate() -> None:
    betas = (0.9, 0.99)
    net, probe = model(), Probe()
    scheduler = LearningRateScheduler(warmup(), bias_correction=betas)
    make_loop(net, batches(20, 4), callbacks=[scheduler, probe]).fit(net, 3)
    expected = [
        rate * adam_bias_correction(step, betas)
        for step, rate in enumerate(warmup().with_total_steps(15).values())
    ]
    assert probe.lrs == pytest.approx(expected)
    assert scheduler.lr == pytest.approx(expected[-1])
    assert all(rate >= 0 for rate in probe.lrs)


def test_a_schedule_shorter_than_the_fit_is_refused_at_training_start() -> None:
    net = model()
    short = Schedule([Segment("linear", start=0.1, end=0.0, steps=6)])
    loop = make_loop(net, batches(20, 4), callbacks=[LearningRateScheduler(short)])
    with pytest.raises(ConfigError, match=r"covers 6 steps but the fit takes 10 \(2 epochs x 5"):
        loop.fit(net, 2)
    too_short = make_loop(net, batches(20, 4), callbacks=[LearningRateScheduler(warmup())])
    with pytest.raises(ConfigError, match="cannot be fitted to this fit's 5 steps"):
        too_short.fit(net, 1)


def test_unsized_data_needs_a_closed_schedule_and_errors_past_its_end() -> None:
    data = Unsized(list(batches(20, 4)))
    net = model()
    loop = make_loop(net, data, callbacks=[LearningRateScheduler(warmup())])
    with pytest.raises(ConfigError, match=r"fit's length is unknown.*total_steps"):
        loop.fit(net, 1)
    probe = Probe()
    closed = LearningRateScheduler(warmup().with_total_steps(12))
    loop = make_loop(net, data, callbacks=[closed, probe])
    with pytest.raises(ConfigError, match=r"Step 12 is outside the schedule"):
        loop.fit(net, 3)
    assert len(probe.lrs) == 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": lambda step: 0.1}, "needs a Schedule; got function"),
        ({"per": "batch"}, "per must be 'step' or 'epoch'"),
        ({"accumulation": 0}, "accumulation must be an int >= 1"),
        ({"bias_correction": (0.9, 1.5)}, "betas must lie in"),
    ],
)
def test_configuration_errors(kwargs: dict[str, object], message: str) -> None:
    options: dict[str, object] = {"schedule": warmup(), **kwargs}
    with pytest.raises(ConfigError, match=message):
        LearningRateScheduler(**options)  # type: ignore[arg-type]


def test_state_dict_round_trips_the_step_count() -> None:
    net = model()
    scheduler = LearningRateScheduler(warmup())
    make_loop(net, batches(20, 4), callbacks=[scheduler]).fit(net, 3)
    state = scheduler.state_dict()
    assert state == {"steps_before_epoch": 15}
    other = LearningRateScheduler(warmup())
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert scheduler.lr == 0.0  # the last step of the filled schedule

"""Schedules: the original's step counting, torch's schedulers, errors, bias correction."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch.optim import lr_scheduler

from statemachine_loop.errors import ConfigError
from statemachine_loop.schedules import (
    SHAPES,
    NamedShape,
    Schedule,
    Segment,
    adam_bias_correction,
    constant,
    cosine,
    exponential,
    linear,
)

PEAK = 0.1


def warmup(total: int | None = None) -> Schedule:
    """The original S4TF example: linear warmup to PEAK over 10 steps, then linear decay to 0."""
    return Schedule(
        [Segment("linear", start=0, end=PEAK, steps=10), Segment("linear", end=0)],
        total_steps=total,
    )


# -- the original's counting --------------------------------------------------------------


def test_original_warmup_example() -> None:
    schedule = warmup(30)
    values = schedule.values()
    assert len(values) == schedule.total_steps == 30
    assert values[0] == 0.0
    assert values[9] == pytest.approx(PEAK, abs=1e-15)
    assert values[29] == 0.0
    assert max(values) == values[9]
    assert values[:10] == pytest.approx([PEAK * i / 9 for i in range(10)])
    # the decay spans steps 9..29 inclusive: 21 steps, 20 intervals
    assert values[9:] == pytest.approx([PEAK * (1 - i / 20) for i in range(21)])


def test_adjacent_segments_share_a_step_and_the_earlier_value_holds() -> None:
    schedule = Schedule(
        [
            Segment("constant", end=1.0, steps=5),
            Segment("linear", start=0.5, end=0.0, steps=3),
        ]
    )
    assert schedule.total_steps == 5 + 3 - 1
    assert schedule.values() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.25, 0.0]


def test_start_defaults_to_previous_end_and_zero_first() -> None:
    schedule = Schedule([Segment("linear", end=2.0, steps=3), Segment("linear", end=4.0, steps=3)])
    assert schedule.values() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_shapes() -> None:
    cosines = Schedule([Segment("cosine", start=1.0, end=0.0, steps=5)]).values()
    assert cosines == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.1464466, 0.0])
    geometric = Schedule([Segment("exponential", start=1.0, end=0.001, steps=4)]).values()
    assert geometric == pytest.approx([1.0, 0.1, 0.01, 0.001])
    squared = Schedule([Segment(lambda p: p * p, start=0.0, end=1.0, steps=3)]).values()
    assert squared == pytest.approx([0.0, 0.25, 1.0])
    assert Schedule([Segment("constant", end=0.3)], total_steps=4).values() == [0.3] * 4
    assert Schedule([Segment("linear", start=5.0, end=1.0, steps=1)]).values() == [1.0]


def test_open_schedule_is_filled_by_with_total_steps() -> None:
    schedule = warmup()
    assert schedule.total_steps is None
    filled = schedule.with_total_steps(12)
    assert filled.total_steps == 12
    assert filled.values()[-1] == 0.0
    assert filled.with_total_steps(12) is filled
    with pytest.raises(ConfigError, match="open"):
        schedule(0)
    with pytest.raises(ConfigError, match="open"):
        schedule.values()


# -- the shapes as importable objects ------------------------------------------------------

OBJECTS = {"constant": constant, "linear": linear, "cosine": cosine, "exponential": exponential}

#: Segment configurations as (start, end, steps) per segment, and total_steps; a start of
#: None inherits the previous end. Every one is valid for every shape (constant's starts are
#: None or equal to the end, exponential's ends positive).
CONFIGS: list[tuple[list[tuple[float | None, float, int | None]], int | None]] = [
    ([(1.0, 1.0, 7)], None),
    ([(0.5, 0.5, 1)], None),
    ([(0.8, 0.8, 5), (None, 0.05, None)], 17),
    ([(0.8, 0.8, 4), (None, 0.3, 6), (0.3, 0.3, None)], 30),
    ([(2.0, 2.0, 3), (None, 0.01, 12)], None),
]


def _schedule(shape: object, config: list[tuple[float | None, float, int | None]]) -> Schedule:
    segments = [Segment(shape, start=a, end=b, steps=n) for a, b, n in config]  # type: ignore[arg-type]
    return Schedule(segments)


def _config(name: str, index: int) -> tuple[list[tuple[float | None, float, int | None]], int]:
    """Config ``index`` for shape ``name``: non-constant shapes get a start apart from the end."""
    config, total = CONFIGS[index]
    if name != "constant":
        config = [(None if a is None else a * 1.5 + 0.1, b, n) for a, b, n in config]
    open_length = sum((n or 0) - 1 for _, _, n in config) + 1
    return config, total if total is not None else open_length


def test_shape_names_and_objects() -> None:
    assert SHAPES == ("constant", "linear", "cosine", "exponential")
    for name in SHAPES:
        shape = OBJECTS[name]
        assert isinstance(shape, NamedShape)
        assert shape.name == name == repr(shape)
        assert Segment(name, end=1.0).shape is shape
        assert shape.__doc__ and shape.__doc__.strip()


@pytest.mark.parametrize("index", range(len(CONFIGS)))
@pytest.mark.parametrize("name", SHAPES)
def test_function_form_gives_the_string_forms_values(name: str, index: int) -> None:
    config, total = _config(name, index)
    by_name = _schedule(name, config).with_total_steps(total)
    by_object = _schedule(OBJECTS[name], config).with_total_steps(total)
    assert by_object.segments == by_name.segments
    assert len(by_object.values()) == total
    assert by_object.values() == by_name.values()  # identical floats, not approx


def test_called_shapes_give_their_formulas() -> None:
    assert linear(2.0, 4.0, 0.25) == 2.5
    assert cosine(1.0, 0.0, 0.5) == pytest.approx(0.5)
    assert cosine(1.0, 0.0, 0.0) == 1.0 and cosine(1.0, 0.0, 1.0) == 0.0
    assert exponential(1.0, 0.01, 0.5) == pytest.approx(0.1)
    assert constant(3.0, 0.7, 0.0) == constant(3.0, 0.7, 1.0) == 0.7
    warm = Schedule([Segment(linear, start=0, end=PEAK, steps=10), Segment(linear, end=0)], 30)
    assert warm.values() == warmup(30).values()
    assert warm.values()[:10] == pytest.approx([PEAK * i / 9 for i in range(10)])


def test_segments_compare_hash_and_repr_alike() -> None:
    for name, shape in OBJECTS.items():
        by_name = Segment(name, start=0.5, end=0.5, steps=10)  # type: ignore[arg-type]
        by_object = Segment(shape, start=0.5, end=0.5, steps=10)
        assert by_object == by_name and hash(by_object) == hash(by_name)
        assert (
            repr(by_object)
            == repr(by_name)
            == (f"Segment(shape={name}, start=0.5, end=0.5, steps=10)")
        )
        assert pickle.loads(pickle.dumps(by_object)) == by_name
        assert copy.deepcopy(by_object) == by_name
    assert Segment(linear, end=1.0) != Segment("cosine", end=1.0)
    assert Segment(linear, end=1.0) != Segment(lambda p: p, end=1.0)


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("exponential", [(0.0, 1.0, 3)], "exponential from 0.0 to 1.0; both ends must be positive"),
        ("exponential", [(None, 1.0, 3)], "exponential from 0.0 to 1.0"),
        ("exponential", [(1.0, -0.5, 3)], "exponential from 1.0 to -0.5"),
        ("exponential", [(None, 0.0, 3)], "exponential from 0.0 to 0.0"),
        ("constant", [(0.5, 1.0, 3)], "segment 0 .* constant but has start=0.5 and end=1.0"),
        ("constant", [(0.2, 0.2, 3), (0.0, 0.2, 3)], "segment 1 .* start=0.0 and end=0.2"),
    ],
)
def test_function_form_is_checked_like_the_string_form(
    name: str, config: list[tuple[float | None, float, int | None]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as by_name:
        _schedule(name, config)
    with pytest.raises(ConfigError, match=message) as by_object:
        _schedule(OBJECTS[name], config)
    assert str(by_object.value) == str(by_name.value)


def test_a_constant_may_omit_start_or_repeat_its_end() -> None:
    for shape in ("constant", constant):
        ramp = [Segment("linear", end=1.0, steps=3)]
        omitted = Schedule([*ramp, Segment(shape, end=0.4, steps=3)]).values()
        repeated = Schedule([*ramp, Segment(shape, start=0.4, end=0.4, steps=3)]).values()
        assert omitted == repeated == [0.0, 0.5, 1.0, 0.4, 0.4]


def test_a_user_function_of_progress_still_bends_the_line() -> None:
    def cosine_of_progress(p: float) -> float:
        return (1.0 - math.cos(math.pi * p)) / 2.0

    config: list[tuple[float | None, float, int | None]] = [(0.9, 0.1, 6), (None, 0.3, 4)]
    assert _schedule(lambda p: p, config).values() == _schedule(linear, config).values()
    assert _schedule(cosine_of_progress, config).values() == _schedule(cosine, config).values()
    squared = _schedule(lambda p: p * p, [(1.0, 3.0, 3)]).values()
    assert squared == [1.0, 1.5, 3.0]
    user = Segment(cosine_of_progress, end=1.0)
    assert user.shape is cosine_of_progress
    with pytest.raises(ConfigError, match="shape must be one of 'constant', 'linear'"):
        Segment("Linear", end=1.0)  # type: ignore[arg-type]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Schedule([]), "non-empty list of Segment"),
        (lambda: Schedule(["linear"]), "segment 0 must be a Segment; got str"),  # type: ignore[list-item]
        (lambda: Segment("step", end=1.0), "shape must be one of"),
        (lambda: Segment("linear", end=math.nan), "end must be a finite number"),
        (lambda: Segment("linear", start="0", end=1.0), "start must be a finite number"),  # type: ignore[arg-type]
        (lambda: Segment("linear", end=1.0, steps=0), "steps must be an int >= 1"),
        (
            lambda: Schedule([Segment("linear", end=1.0), Segment("linear", end=0.0, steps=3)]),
            "segment 0 .* has no steps; only the last segment may omit steps",
        ),
        (
            lambda: Schedule(
                [Segment("linear", end=1.0, steps=3), Segment("linear", end=0.0, steps=1)]
            ),
            "segment 1 .* needs steps >= 2",
        ),
        (
            lambda: Schedule([Segment("constant", start=0.5, end=1.0, steps=3)]),
            "constant but has start=0.5 and end=1.0",
        ),
        (
            lambda: Schedule([Segment("exponential", end=1.0, steps=3)]),
            "exponential from 0.0 to 1.0; both ends must be positive",
        ),
        (lambda: warmup(10), "would fill the steps left up to total_steps=10"),
        (
            lambda: Schedule([Segment("linear", end=1.0, steps=3)], total_steps=5),
            "segments span 3 steps but total_steps=5",
        ),
        (lambda: warmup(0), "total_steps must be an int >= 1"),
    ],
)
def test_bad_segments_are_config_errors(build: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()  # type: ignore[operator]


@pytest.mark.parametrize("step", [-1, 30, 31, 2.0, True])
def test_a_step_outside_the_schedule_is_a_clear_error(step: object) -> None:
    with pytest.raises(ConfigError, match=r"outside the schedule, which covers steps 0\.\.29"):
        warmup(30)(step)  # type: ignore[arg-type]


# -- torch's schedulers describe the same curves ------------------------------------------


def torch_rates(make: object, base: float, steps: int) -> list[float]:
    """The rate each of ``steps`` optimizer steps uses under a torch scheduler."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = make(optimizer)  # type: ignore[operator]
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_equals_linear_lr() -> None:
    base, n = 0.2, 11
    ours = Schedule(
        [
            Segment("linear", start=0.25 * base, end=0.75 * base, steps=n),
            Segment("constant", end=0.75 * base),
        ],
        total_steps=20,
    ).values()
    theirs = torch_rates(
        lambda opt: lr_scheduler.LinearLR(
            opt, start_factor=0.25, end_factor=0.75, total_iters=n - 1
        ),
        base,
        20,
    )
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_equals_cosine_annealing_lr() -> None:
    base, eta_min, t_max = 0.5, 0.01, 16
    ours = Schedule([Segment("cosine", start=base, end=eta_min, steps=t_max + 1)]).values()
    theirs = torch_rates(
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min),
        base,
        t_max + 1,
    )
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_equals_exponential_lr() -> None:
    base, gamma, n = 0.3, 0.8, 12
    ours = Schedule(
        [Segment("exponential", start=base, end=base * gamma ** (n - 1), steps=n)]
    ).values()
    theirs = torch_rates(lambda opt: lr_scheduler.ExponentialLR(opt, gamma=gamma), base, n)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_equals_warmup_then_linear_decay_lambda_lr() -> None:
    base, warm, total = PEAK, 9, 40

    def factor(step: int) -> float:
        if step < warm:
            return step / warm
        return max(0.0, (total - step) / (total - warm))

    ours = warmup(total + 1).values()
    theirs = torch_rates(lambda opt: lr_scheduler.LambdaLR(opt, factor), base, total + 1)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


# -- Adam bias correction ----------------------------------------------------------------------


def test_bias_correction_formula_and_sign() -> None:
    betas = (0.9, 0.999)
    assert adam_bias_correction(0, betas) == pytest.approx(math.sqrt(0.001) / 0.1)
    factors = [adam_bias_correction(step, betas) for step in range(2000)]
    assert all(f > 0 for f in factors)
    assert factors[-1] == pytest.approx(1.0, abs=0.2)
    # the original's last version divided by beta1 - beta2^t: negative for ~100 steps
    original = [math.sqrt(1 - 0.999**t) / (0.9 - 0.999**t) for t in range(1, 200)]
    assert sum(f < 0 for f in original) == 105
    with pytest.raises(ConfigError, match="betas must lie in"):
        adam_bias_correction(0, (1.0, 0.999))


def test_bias_correction_turns_uncorrected_adam_into_torch_adam() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(30)]
    lr, betas = 0.01, (0.9, 0.999)
    reference = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=lr, betas=betas, eps=0.0)
    ours = torch.zeros(5, dtype=torch.float64)
    m = torch.zeros(5, dtype=torch.float64)
    v = torch.zeros(5, dtype=torch.float64)
    for step, grad in enumerate(grads):
        reference.grad = grad.clone()
        adam.step()
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad * grad
        ours -= lr * adam_bias_correction(step, betas) * m / v.sqrt()
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-12, atol=1e-14)


# -- plot ---------------------------------------------------------------------------------------


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import statemachine_loop.schedules as schedules

    def missing(name: str) -> object:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(schedules.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"needs matplotlib.*statemachine-loop\[plot\]"):
        warmup(30).plot()


def test_plot_draws_the_values() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    ax = warmup(30).plot()
    xs, ys = ax.lines[0].get_data()
    assert list(ys) == warmup(30).values()
    assert list(xs) == list(range(30))

"""Learning-rate schedules built from segments, after the original ``makeSchedule``.

A :class:`Schedule` is a list of :class:`Segment` s laid end to end over optimizer
steps ``0 .. total_steps - 1``; ``schedule(step)`` is the rate at that step. The
original Swift for TensorFlow example, a linear warmup to ``peak`` over ten steps
and then a linear decay to zero over the rest of the fit, reads::

    Schedule([Segment("linear", start=0, end=peak, steps=10), Segment("linear", end=0)])

Counting steps, as in the original:

* a segment of ``steps`` n spans n steps *including both its ends*: it starts at its
  ``start`` and reaches its ``end`` on its last step;
* adjacent segments *share their boundary step*, and the earlier segment's value
  holds there, so segment ``i + 1`` begins on segment ``i``'s last step. Above, step 9
  is ``peak`` (the warmup's last step and the decay's first) and the last step of the
  fit is 0;
* only the last segment may omit ``steps``; it then fills the schedule up to
  ``total_steps``, given here or filled in from the fit by
  :class:`~statemachine_loop.callbacks.schedule.LearningRateScheduler`
  (:meth:`Schedule.with_total_steps`).

How this maps onto torch's schedulers (step t = the t-th ``optimizer.step()``, 0-based,
i.e. after t calls of ``scheduler.step()``), with ``base`` the optimizer's ``lr``:

* ``LinearLR(start_factor=a, end_factor=b, total_iters=n - 1)`` is
  ``Segment("linear", start=a * base, end=b * base, steps=n)`` followed by
  ``Segment("constant", end=b * base)``;
* ``CosineAnnealingLR(T_max=m, eta_min=e)`` over its first half-period is
  ``Segment("cosine", start=base, end=e, steps=m + 1)``;
* ``ExponentialLR(gamma=g)`` over n steps is
  ``Segment("exponential", start=base, end=base * g ** (n - 1), steps=n)``;
* the common warmup-then-linear-decay ``LambdaLR`` with ``w`` warmup steps out of
  ``T`` (``t / w`` up to ``w``, then ``(T - t) / (T - w)``) is
  ``Schedule([Segment("linear", start=0, end=base, steps=w + 1),
  Segment("linear", end=0)], total_steps=T + 1)`` — the original's example with
  ``w = 9``.

The shapes are also importable objects, :data:`linear`, :data:`cosine`,
:data:`exponential` and :data:`constant` (each a :class:`NamedShape`), and a name is
only another spelling of its object: ``Segment(linear, start=0, end=peak, steps=10)``
is, and compares equal to, ``Segment("linear", start=0, end=peak, steps=10)``. Any
other function ``f`` of progress in [0, 1] makes a segment ``start + (end - start) * f(p)``.
"""

from __future__ import annotations

import bisect
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

import attrs

from statemachine_loop.errors import ConfigError, MissingDependencyError

__all__ = [
    "SHAPES",
    "NamedShape",
    "Schedule",
    "Segment",
    "Shape",
    "ShapeName",
    "adam_bias_correction",
    "constant",
    "cosine",
    "exponential",
    "linear",
]


def _any_ends(start: float, end: float, start_given: bool) -> str | None:
    return None


@attrs.frozen(slots=False, repr=False)
class NamedShape:
    """A built-in shape: the rate at progress ``p`` of a segment, given both its ends.

    A plain function ``f`` of progress only bends the straight line,
    ``start + (end - start) * f(p)``; it cannot be geometric or ignore ``start``. A
    named shape is called with both ends, ``shape(start, end, p)``, and says what is
    wrong with the ends it is given (``check(start, end, start_given)`` returns the
    problem or ``None``), which :class:`Schedule` raises as a ``ConfigError``. The
    four are :data:`linear`, :data:`cosine`, :data:`exponential` and :data:`constant`;
    :class:`Segment` turns each name in :data:`SHAPES` into its object, and named
    shapes compare by ``name``.
    """

    name: str
    curve: Callable[[float, float, float], float] = attrs.field(eq=False)
    check: Callable[[float, float, bool], str | None] = attrs.field(eq=False, default=_any_ends)

    def __attrs_post_init__(self) -> None:
        # Each shape reads as the function it wraps: ``linear.__doc__`` is its own.
        object.__setattr__(self, "__doc__", self.curve.__doc__)

    def __call__(self, start: float, end: float, progress: float) -> float:
        """The rate at ``progress`` in [0, 1] of a segment from ``start`` to ``end``."""
        return self.curve(start, end, progress)

    def __repr__(self) -> str:
        return self.name


def _linear(start: float, end: float, progress: float) -> float:
    """A straight line from ``start`` to ``end``: ``start + (end - start) * p``.

    The original's warmup and decay, and torch's ``LinearLR``.
    """
    return start + (end - start) * progress


def _cosine(start: float, end: float, progress: float) -> float:
    """Half a cosine from ``start`` to ``end``, flat at both ends, so it eases in and out.

    ``start + (end - start) * (1 - cos(pi * p)) / 2``: ``CosineAnnealingLR`` up to ``T_max``.
    """
    return start + (end - start) * ((1.0 - math.cos(math.pi * progress)) / 2.0)


def _exponential(start: float, end: float, progress: float) -> float:
    """Geometric from ``start`` to ``end``: ``start * (end / start) ** p``.

    The same factor every step, as torch's ``ExponentialLR``; not a bent straight line,
    so it needs both ends, and both must be positive.
    """
    return float(start * (end / start) ** progress)


def _positive_ends(start: float, end: float, start_given: bool) -> str | None:
    if start > 0 and end > 0:
        return None
    return (
        f"is exponential from {start} to {end}; both ends must be positive (give start= "
        "when the previous segment ends at 0)."
    )


def _constant(start: float, end: float, progress: float) -> float:
    """Holds ``end`` on every step; ``start`` must be omitted or equal ``end``.

    A flat stretch, such as the rate ``LinearLR`` keeps after its ramp; a start that
    differs from the end would be silently ignored, so it is refused.
    """
    return end


def _start_is_end(start: float, end: float, start_given: bool) -> str | None:
    if not start_given or start == end:
        return None
    return (
        f"is constant but has start={start} and end={end}; a constant segment holds its "
        "end, so omit start or make it equal to end."
    )


linear: Final = NamedShape("linear", _linear)
cosine: Final = NamedShape("cosine", _cosine)
exponential: Final = NamedShape("exponential", _exponential, _positive_ends)
constant: Final = NamedShape("constant", _constant, _start_is_end)

#: Each shape name and its object; a name is only another spelling of the object.
_NAMED: Final[Mapping[str, NamedShape]] = MappingProxyType(
    {shape.name: shape for shape in (constant, linear, cosine, exponential)}
)

#: The names of the built-in shapes.
ShapeName: TypeAlias = Literal["constant", "linear", "cosine", "exponential"]
#: A segment's shape: a :data:`ShapeName`, a :class:`NamedShape`, or a function of progress.
Shape: TypeAlias = "ShapeName | NamedShape | Callable[[float], float]"

#: The named shapes.
SHAPES: Final[tuple[str, ...]] = tuple(_NAMED)


def _to_shape(shape: Shape) -> NamedShape | Callable[[float], float]:
    if isinstance(shape, str) and shape in _NAMED:
        return _NAMED[shape]
    if not isinstance(shape, str) and callable(shape):
        return shape
    raise ConfigError(
        f"A Segment's shape must be one of {', '.join(map(repr, SHAPES))} or a function "
        f"of progress in [0, 1]; got {shape!r}."
    )


def _check_rate(instance: Segment, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None and attribute.name == "start":
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"A Segment's {attribute.name} must be a finite number; got {value!r}.")


def _check_steps(instance: Segment, attribute: attrs.Attribute[Any], steps: object) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"A Segment's steps must be an int >= 1 or None; got {steps!r}.")


@attrs.frozen
class Segment:
    """One piece of a :class:`Schedule`: a curve from ``start`` to ``end`` over ``steps`` steps.

    ``shape`` is :data:`linear`, :data:`cosine` (half a cosine, flat at both ends),
    :data:`exponential` (geometric; ``start`` and ``end`` must be positive),
    :data:`constant` (holds ``end``; ``start`` must be omitted or equal ``end``), or
    its name (``"linear"`` ..., turned into that object here, so both spellings give
    equal segments), or any function ``f`` of progress ``p`` in [0, 1], giving
    ``start + (end - start) * f(p)`` (so ``f(0)`` should be 0 and ``f(1)`` 1).
    ``start`` defaults to the previous segment's ``end`` (0 for the first). ``steps``
    counts both ends; only the last segment of a schedule may leave it ``None``.
    """

    shape: NamedShape | Callable[[float], float] = attrs.field(converter=_to_shape)
    start: float | None = attrs.field(default=None, kw_only=True, validator=_check_rate)
    end: float = attrs.field(kw_only=True, validator=_check_rate)
    steps: int | None = attrs.field(default=None, kw_only=True, validator=_check_steps)


@attrs.frozen
class _Piece:
    """A resolved segment: absolute first and last step, start and end rates."""

    first: int
    last: int
    start: float
    end: float
    shape: NamedShape | Callable[[float], float]

    def value(self, step: int) -> float:
        span = self.last - self.first
        progress = 1.0 if span == 0 else (step - self.first) / span
        if isinstance(self.shape, NamedShape):
            return self.shape(self.start, self.end, progress)
        return self.start + (self.end - self.start) * float(self.shape(progress))


class Schedule:
    """A learning rate per optimizer step, from segments laid end to end.

    ``schedule(step)`` returns the rate at 0-based ``step``. A schedule whose last
    segment omits ``steps`` and that has no ``total_steps`` is *open*: it cannot be
    evaluated until :meth:`with_total_steps` (or ``LearningRateScheduler`` at
    ``fit`` time) says how long the fit is. Every problem with the segments is a
    :class:`~statemachine_loop.ConfigError` here, at construction, and so is a step
    past the schedule's end at evaluation (the original ran off its end silently).
    """

    def __init__(self, segments: Sequence[Segment], total_steps: int | None = None) -> None:
        if isinstance(segments, Segment) or not isinstance(segments, Sequence) or not segments:
            raise ConfigError(f"Schedule needs a non-empty list of Segment; got {segments!r}.")
        for index, segment in enumerate(segments):
            if not isinstance(segment, Segment):
                raise ConfigError(
                    f"Schedule segment {index} must be a Segment; got {type(segment).__name__}."
                )
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ConfigError(f"total_steps must be an int >= 1 or None; got {total_steps!r}.")
        self._segments = tuple(segments)
        self._pieces = self._resolve(self._segments, total_steps)
        self._lasts = [piece.last for piece in self._pieces]

    @staticmethod
    def _resolve(segments: tuple[Segment, ...], total_steps: int | None) -> tuple[_Piece, ...]:
        pieces: list[_Piece] = []
        first, previous_end = 0, 0.0
        for index, segment in enumerate(segments):
            is_last = index == len(segments) - 1
            where = f"Schedule segment {index} ({segment.shape!r})"
            steps = segment.steps
            if steps is None and not is_last:
                raise ConfigError(
                    f"{where} has no steps; only the last segment may omit steps (it then "
                    "fills the schedule up to total_steps)."
                )
            if steps is None:
                if total_steps is None:
                    pieces.append(_Piece(first, -1, 0.0, 0.0, segment.shape))  # open
                    break
                steps = total_steps - first
                if steps < (2 if index else 1):
                    raise ConfigError(
                        f"{where} would fill the steps left up to total_steps={total_steps}, "
                        f"but the segments before it already reach step {first}; "
                        "give a larger total_steps."
                    )
            if index and steps < 2:
                raise ConfigError(
                    f"{where} has steps={steps}, but a segment after the first shares its "
                    "first step with the segment before, so it needs steps >= 2."
                )
            start = previous_end if segment.start is None else float(segment.start)
            end = float(segment.end)
            if isinstance(segment.shape, NamedShape):
                problem = segment.shape.check(start, end, segment.start is not None)
                if problem is not None:
                    raise ConfigError(f"{where} {problem}")
            pieces.append(_Piece(first, first + steps - 1, start, end, segment.shape))
            first, previous_end = first + steps - 1, end
        length = pieces[-1].last + 1
        if total_steps is not None and pieces[-1].last >= 0 and length != total_steps:
            raise ConfigError(
                f"The segments span {length} steps but total_steps={total_steps}; leave the "
                "last segment's steps out to fill up to total_steps, or make them agree."
            )
        return tuple(pieces)

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The segments, as given."""
        return self._segments

    @property
    def total_steps(self) -> int | None:
        """How many steps the schedule spans; ``None`` while it is open."""
        last = self._pieces[-1].last
        return None if last < 0 else last + 1

    def with_total_steps(self, total_steps: int) -> Schedule:
        """This schedule with its open last segment filled up to ``total_steps``.

        A schedule that is not open is returned as is when it already spans
        ``total_steps``, and is a :class:`ConfigError` otherwise.
        """
        if total_steps == self.total_steps:
            return self
        return Schedule(self._segments, total_steps)

    def _length(self) -> int:
        total = self.total_steps
        if total is None:
            raise ConfigError(
                "This Schedule is open: its last segment has no steps and no total_steps "
                "was given. Pass total_steps=..., call with_total_steps(n), or let "
                "LearningRateScheduler fill it in from the fit."
            )
        return total

    def __call__(self, step: int) -> float:
        """The learning rate at 0-based ``step``."""
        total = self._length()
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total:
            raise ConfigError(
                f"Step {step!r} is outside the schedule, which covers steps 0..{total - 1}; "
                "the fit takes more steps than the schedule was built for."
            )
        return self._pieces[bisect.bisect_left(self._lasts, step)].value(step)

    def values(self) -> list[float]:
        """The rate at every step of the schedule, in order."""
        return [self(step) for step in range(self._length())]

    def plot(self, ax: Any = None) -> Any:
        """Draw the schedule with matplotlib (the ``plot`` extra) and return the axes.

        Draws into ``ax`` when given, else into a new figure. Raises
        :class:`~statemachine_loop.errors.MissingDependencyError` (an ``ImportError``)
        with the install hint when matplotlib is missing.
        """
        try:
            pyplot = importlib.import_module("matplotlib.pyplot")
        except ImportError as error:
            raise MissingDependencyError(
                "Schedule.plot needs matplotlib, which is not installed; install it with "
                "pip install 'statemachine-loop[plot]' (or pip install matplotlib)."
            ) from error
        values = self.values()
        if ax is None:
            _, ax = pyplot.subplots(figsize=(6, 3))
        ax.plot(range(len(values)), values)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        return ax

    def __repr__(self) -> str:
        return f"Schedule({list(self._segments)!r}, total_steps={self.total_steps!r})"


def adam_bias_correction(step: int, betas: tuple[float, float]) -> float:
    """Adam's bias correction folded into the rate: ``sqrt(1 - b2^t) / (1 - b1^t)``.

    ``t = step + 1`` (Adam counts from 1). Multiply the scheduled rate by this for an
    optimizer that does *not* correct its moments itself (BERT's ``AdamWeightDecay``);
    torch's ``Adam`` and ``AdamW`` already do, and correcting twice is wrong. The
    factor is positive for every step and tends to 1; the original's last version
    divided by ``b1 - b2^t`` instead, which is negative for the first ~100 steps with
    the usual betas.
    """
    beta1, beta2 = betas
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ConfigError(f"Adam betas must lie in [0, 1); got {betas!r}.")
    t = step + 1
    return math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

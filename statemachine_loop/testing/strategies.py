"""Hypothesis strategies for random runs and random decisions, and a tiny real fit.

Property tests of a loop (ours, or a user's callbacks against ours) need three things:
random *shapes* of a run (:func:`run_shapes`), random *scripts* of what callbacks
decide and when (:func:`decision_scripts`, played by :class:`ScriptedCallback`), and a
fit small enough to run hundreds of times (:func:`tiny_loop`). Everything here is
deterministic given the drawn values and the seed, so the two engines can be run on
the same example and compared.

Needs ``hypothesis`` (a test dependency, not a runtime one)::

    @given(shape=run_shapes(), script=decision_scripts())
    def test_my_invariant(shape, script):
        recorder = TraceRecorder()
        loop, model = tiny_loop(shape, [*scripted_callbacks(script), recorder])
        ...
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeAlias

import attrs
import torch
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop.callback import Callback, CallbackLike
from statemachine_loop.decisions import Decision, Redirect, Stop, Veto
from statemachine_loop.events import END_EVENTS, START_EVENTS, Event
from statemachine_loop.loop import TrainingLoop
from statemachine_loop.machine import REDIRECT_TARGETS

if TYPE_CHECKING:
    from statemachine_loop.metrics import Metric

__all__ = [
    "Action",
    "Raise",
    "RunShape",
    "ScriptStep",
    "ScriptedCallback",
    "ScriptedError",
    "decision_scripts",
    "run_shapes",
    "scripted_callbacks",
    "tiny_loop",
]

Hook: TypeAlias = Literal["guard", "observer"]


@attrs.frozen
class RunShape:
    """The size of a fit: epochs and batches per phase (0 validation batches: no loader)."""

    epochs: int
    training_batches: int
    validation_batches: int

    @property
    def has_validation(self) -> bool:
        """Whether the fit gets a validation loader at all."""
        return self.validation_batches > 0


def run_shapes(
    *, max_epochs: int = 3, max_training_batches: int = 4, max_validation_batches: int = 3
) -> st.SearchStrategy[RunShape]:
    """Random run shapes: 1..``max_epochs`` epochs, 1.. training and 0.. validation batches.

    Small by default (at most 3 x (4 + 3) batches) so a property test can afford a real
    fit per example; shrinking goes towards one epoch of one batch, no validation.
    """
    return st.builds(
        RunShape,
        epochs=st.integers(1, max_epochs),
        training_batches=st.integers(1, max_training_batches),
        validation_batches=st.integers(0, max_validation_batches),
    )


@attrs.frozen
class Raise:
    """Script action: the hook raises a fresh :class:`ScriptedError`."""

    message: str = "scripted failure"


#: What a scripted hook does: return a decision, or raise.
Action: TypeAlias = Veto | Redirect | Stop | Raise


class ScriptedError(Exception):
    """The exception a :class:`Raise` action raises; a new object each time it fires."""


@attrs.frozen
class ScriptStep:
    """One line of a script: what one hook of one scripted callback does, and when.

    Callback ``slot``'s ``hook`` of ``event``, on its ``occurrence``-th call (1-based,
    counted per hook and event), does ``action``. Calls made once the loop has stopped
    or failed (``stop_reason`` or ``failure`` set: the wind-down) are counted apart, and
    only steps with ``after_stop`` set play there, so a script can reach the wind-down
    at a known call whatever ran before it.
    """

    slot: int
    hook: Hook
    event: Event
    occurrence: int
    action: Action
    after_stop: bool = False


#: Per proposed event, every redirect target the machine allows from some state.
_TARGETS: dict[Event, tuple[Event, ...]] = {
    event: tuple(
        sorted(
            {t for (_, e), ts in REDIRECT_TARGETS.items() if e is event for t in ts},
            key=list(Event).index,
        )
    )
    for event in Event
}


#: Events some state lets a guard redirect, to draw contests over them more often.
_REDIRECTABLE = tuple(event for event in Event if _TARGETS[event])
_HOOKS: tuple[Hook, ...] = ("guard", "observer")
_IN_ORDER_START = tuple(event for event in Event if event in START_EVENTS)
_IN_ORDER_END = tuple(event for event in Event if event in END_EVENTS)
_GUARD_KINDS = ("veto", "redirect", "stop", "raise")
# An observer may only stop; a veto or redirect from one is a LifecycleError, drawn
# less often than what it may do.
_OBSERVER_KINDS = ("stop", "stop", "raise", "veto", "redirect")
_CONTEST_KINDS = ("veto", "redirect", "redirect", "stop")


def _reason(slot: int, hook: str, event: Event, occurrence: int, after_stop: bool) -> str:
    return f"slot {slot} {hook} {event.value} #{occurrence}{' after stop' if after_stop else ''}"


@st.composite
def _step(
    draw: st.DrawFn,
    slot: int,
    hook: Hook,
    event: Event,
    occurrence: int,
    kinds: tuple[str, ...],
    any_target: bool = True,
    after_stop: bool = False,
) -> ScriptStep:
    reason = _reason(slot, hook, event, occurrence, after_stop)
    kind = draw(st.sampled_from(kinds))
    action: Action
    if kind == "veto":
        action = Veto(reason)
    elif kind == "stop":
        action = Stop(reason)
    elif kind == "raise":
        action = Raise(reason)
    else:
        # Mostly a target some state allows; sometimes any event, which may be refused.
        targets = _TARGETS[event]
        allowed = bool(targets) and (not any_target or draw(st.booleans()))
        pool = targets if allowed else tuple(Event)
        action = Redirect(draw(st.sampled_from(pool)), reason)
    return ScriptStep(slot, hook, event, occurrence, action, after_stop)


def _occurrences(max_occurrence: int) -> st.SearchStrategy[int]:
    return st.integers(1, 3) | st.integers(1, max_occurrence)


@st.composite
def _single(draw: st.DrawFn, slots: int, max_occurrence: int) -> list[ScriptStep]:
    slot = draw(st.integers(0, slots - 1))
    hook = draw(st.sampled_from(_HOOKS))
    event = draw(st.sampled_from(list(Event)))
    occurrence = draw(_occurrences(max_occurrence))
    # Only end events fire in a wind-down (and observers of the event that stopped).
    after_stop = event in END_EVENTS and draw(st.booleans())
    if after_stop:
        occurrence = draw(st.integers(1, 2))
    kinds = _GUARD_KINDS if hook == "guard" else _OBSERVER_KINDS
    return [draw(_step(slot, hook, event, occurrence, kinds, after_stop=after_stop))]


@st.composite
def _contest(draw: st.DrawFn, slots: int, max_occurrence: int) -> list[ScriptStep]:
    """Every slot's guard decides the same proposal: precedence and redirect conflicts."""
    event = draw(st.sampled_from(_REDIRECTABLE) | st.sampled_from(list(Event)))
    occurrence = draw(_occurrences(max_occurrence))
    return [
        draw(_step(slot, "guard", event, occurrence, _CONTEST_KINDS, any_target=False))
        for slot in range(slots)
    ]


@st.composite
def _wind_down(draw: st.DrawFn, slots: int, max_occurrence: int) -> list[ScriptStep]:
    """A stop or a raise, then hooks of end events that play during the wind-down."""
    hook = draw(st.sampled_from(_HOOKS))
    event = draw(st.sampled_from(_IN_ORDER_START))
    occurrence = draw(_occurrences(max_occurrence))
    slot = draw(st.integers(0, slots - 1))
    steps = [draw(_step(slot, hook, event, occurrence, ("stop", "raise")))]
    for late_hook in draw(st.lists(st.sampled_from(_HOOKS), min_size=1, max_size=2)):
        kinds = _GUARD_KINDS if late_hook == "guard" else _OBSERVER_KINDS
        late_slot = draw(st.integers(0, slots - 1))
        late_event = draw(st.sampled_from(_IN_ORDER_END))
        late = _step(
            late_slot, late_hook, late_event, draw(st.integers(1, 2)), kinds, after_stop=True
        )
        steps.append(draw(late))
    return steps


def decision_scripts(
    *, slots: int = 2, max_steps: int = 5, max_occurrence: int = 8
) -> st.SearchStrategy[list[ScriptStep]]:
    """Random scripts of what ``slots`` scripted callbacks decide, and when.

    A script is up to ``max_steps`` groups. Most groups are one step: a callback slot,
    a hook kind (guard, or less often observer), any of the twelve events, an
    occurrence (biased to the first few calls) and an action: ``Veto``, ``Redirect``
    (to a target allowed from some state, or to any event, so illegal redirects are
    drawn too), ``Stop`` or ``Raise``. Observers mostly stop or raise; they sometimes
    veto or redirect, which the loop must refuse. Other groups are *contests*: every
    slot's guard decides the same proposal, so precedence, outranked decisions and
    conflicting redirects are exercised; and *wind-downs*: a stop or a raise, then
    decisions and raises from hooks of end events during the wind-down
    (:attr:`ScriptStep.after_stop`). Decisions on scope ends and on calls that never
    happen are drawn as well. Shrinks to the empty script.
    """
    group = (
        _single(slots, max_occurrence)
        | _contest(slots, max_occurrence)
        | _wind_down(slots, max_occurrence)
    )
    groups = st.lists(group, max_size=max_steps)
    return groups.map(lambda drawn: [step for group in drawn for step in group])


def _hook(hook: Hook, event: Event) -> Callable[[ScriptedCallback, TrainingLoop], Decision | None]:
    def play(self: ScriptedCallback, loop: TrainingLoop) -> Decision | None:
        return self._play(hook, event, loop)

    play.__name__ = f"{'guard' if hook == 'guard' else 'on'}_{event.value}"
    play.__doc__ = f"Play this callback's script for the {hook} of ``{event.value}``."
    return play


class ScriptedCallback(Callback):
    """A callback that plays the steps of a script that belong to its ``slot``.

    When its ``hook`` of ``event`` is called for the ``occurrence``-th time it returns
    the step's decision, or raises a fresh :class:`ScriptedError` for :class:`Raise`.
    Only the hooks its steps name are defined (the others are set to ``None``), so the
    loop's dispatch sees a realistic mix of hooked and unhooked events. The first step
    for a given call wins. ``fired`` lists the steps that fired, in order; ``raised``
    the errors raised, shared between callbacks when a list is passed in, so a test
    can tell which was raised first. Decisions are recorded as ``scripted<slot>``.
    """

    def __init__(
        self, slot: int, script: Sequence[ScriptStep], *, raised: list[ScriptedError] | None = None
    ) -> None:
        self.slot = slot
        self._actions: dict[tuple[Hook, Event, bool, int], Action] = {}
        for step in script:
            if step.slot == slot:
                key = (step.hook, step.event, step.after_stop, step.occurrence)
                self._actions.setdefault(key, step.action)
        self._calls: Counter[tuple[Hook, Event, bool]] = Counter()
        self.fired: list[ScriptStep] = []
        self.raised: list[ScriptedError] = [] if raised is None else raised
        hooked = {(hook, event) for hook, event, _, _ in self._actions}
        for event in Event:
            if ("guard", event) not in hooked:
                setattr(self, f"guard_{event.value}", None)
            if ("observer", event) not in hooked:
                setattr(self, f"on_{event.value}", None)

    @property
    def name(self) -> str:
        """``scripted<slot>``, so each slot's decisions are told apart in ``loop.decisions``."""
        return f"scripted{self.slot}"

    def _play(self, hook: Hook, event: Event, loop: TrainingLoop) -> Decision | None:
        late = loop.stop_reason is not None or loop.failure is not None
        self._calls[hook, event, late] += 1
        occurrence = self._calls[hook, event, late]
        action = self._actions.get((hook, event, late, occurrence))
        if action is None:
            return None
        self.fired.append(ScriptStep(self.slot, hook, event, occurrence, action, late))
        if isinstance(action, Raise):
            error = ScriptedError(f"scripted{self.slot}: {action.message}")
            self.raised.append(error)
            raise error
        return action


for _event in Event:
    setattr(ScriptedCallback, f"guard_{_event.value}", _hook("guard", _event))
    setattr(ScriptedCallback, f"on_{_event.value}", _hook("observer", _event))
del _event


def scripted_callbacks(
    script: Sequence[ScriptStep], *, slots: int = 2, raised: list[ScriptedError] | None = None
) -> list[ScriptedCallback]:
    """One :class:`ScriptedCallback` per slot, all appending to one ``raised`` list."""
    shared: list[ScriptedError] = [] if raised is None else raised
    return [ScriptedCallback(slot, script, raised=shared) for slot in range(slots)]


#: Features, classes and samples per batch of :func:`tiny_loop`'s data.
FEATURES, CLASSES, BATCH_SIZE = 4, 3, 2


def tiny_loop(
    shape: RunShape,
    callbacks: Sequence[CallbackLike] = (),
    engine: Literal["compiled", "transitions"] = "compiled",
    *,
    seed: int = 0,
    metrics: Sequence[str | Metric] = ("accuracy",),
) -> tuple[TrainingLoop, torch.nn.Linear]:
    """A real, tiny, deterministic fit: a ``Linear`` classifier on random tensors.

    Model weights and data come from a generator seeded with ``seed`` (the global RNG
    is not touched), batches of :data:`BATCH_SIZE` through an unshuffled
    ``DataLoader``, SGD with momentum and cross-entropy; ``shape.validation_batches ==
    0`` means no validation loader. The same shape, seed and callbacks give bit-equal
    runs, so engines and resumed runs can be compared. Call
    ``loop.fit(model, shape.epochs)``.
    """
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(FEATURES, CLASSES)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))

    def loader(batches: int) -> DataLoader[tuple[torch.Tensor, ...]]:
        samples = batches * BATCH_SIZE
        inputs = torch.randn(samples, FEATURES, generator=generator)
        targets = torch.randint(0, CLASSES, (samples,), generator=generator)
        return DataLoader(TensorDataset(inputs, targets), batch_size=BATCH_SIZE)

    training = loader(shape.training_batches)
    validation = loader(shape.validation_batches) if shape.has_validation else None
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=metrics,
        callbacks=callbacks,
        engine=engine,
        progress=False,
    )
    return loop, model

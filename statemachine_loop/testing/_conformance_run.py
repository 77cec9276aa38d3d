"""How the conformance kit runs one example: the fit, its helpers, and the sweep.

Private to :mod:`statemachine_loop.testing.conformance`. :func:`fit` runs the user's
callback among two scripted ones, between a :class:`~.TraceRecorder` (first) and a
:class:`Snapshot` (last) that copies ``loop.state_dict()`` at the chosen boundary;
it notes the file descriptors and threads left open. :func:`sweep` lists the
deterministic examples run before the random ones: every decision at every event;
:func:`smaller_variants` the candidates when one of them fails. :func:`snippet`
writes an example as code that reruns it.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch

from statemachine_loop.callback import Callback, CallbackLike
from statemachine_loop.decisions import DecisionRecord, Redirect, Stop, Veto
from statemachine_loop.errors import LoopError
from statemachine_loop.events import START_EVENTS, Event
from statemachine_loop.loop import TrainingLoop
from statemachine_loop.machine import REDIRECT_TARGETS
from statemachine_loop.testing.recorder import TraceEntry, TraceRecorder
from statemachine_loop.testing.strategies import (
    Action,
    Raise,
    RunShape,
    ScriptedCallback,
    ScriptedError,
    ScriptStep,
    tiny_loop,
)

__all__ = ["Example", "Run", "fit", "same", "smaller_variants", "snippet", "sweep"]

EngineName = Literal["compiled", "transitions"]
Factory = Callable[[], CallbackLike]
#: Scripted callbacks around the user's.
SLOTS = 2
_HOOKS: tuple[Literal["guard", "observer"], ...] = ("guard", "observer")


def _steps(steps: Iterable[ScriptStep]) -> tuple[ScriptStep, ...]:
    return tuple(steps)


@attrs.frozen
class Example:
    """One fit of the kit: its shape, the scripted callbacks' script, and where it resumes.

    The user's callback sits at ``position`` among the two scripted callbacks (after
    a ``TraceRecorder``); ``checkpoint_at`` is the 0-based clean ``batch_end`` or
    ``epoch_end`` at which ``loop.state_dict()`` is copied for a resumed fit, or
    ``None`` for no resume.
    """

    shape: RunShape
    script: tuple[ScriptStep, ...] = attrs.field(default=(), converter=_steps)
    position: int = 0
    engine: EngineName = "compiled"
    checkpoint_at: int | None = None


class ResumableScripted(ScriptedCallback):
    """A scripted callback that a resumed fit continues: its call counts are its state.

    Silent (counting nothing) during a resume's re-entry events, which the
    uninterrupted fit took before its checkpoint.
    """

    def _play(self, hook: Any, event: Event, loop: TrainingLoop) -> Any:
        return None if loop.resuming else super()._play(hook, event, loop)

    def state_dict(self) -> dict[str, Any]:
        """The calls counted so far, as plain lists."""
        return {"calls": [[h, e.value, late, n] for (h, e, late), n in self._calls.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._calls = Counter({(h, Event(e), bool(late)): n for h, e, late, n in state["calls"]})


class KitRecorder(TraceRecorder):
    """The kit's ``TraceRecorder``, named apart from a user's own recorder."""

    @property
    def name(self) -> str:
        """``conformance-recorder``."""
        return "conformance-recorder"


class Snapshot(Callback):
    """Runs last; copies ``loop.state_dict()`` at the ``at``-th clean boundary.

    The copy is kept only if the next proposal's guards find no stop and no failure:
    an observer's ``Stop`` or raise at the boundary itself is not in the state. In a
    resumed fit it counts the decisions taken during the re-entry events.
    """

    runs_last: ClassVar[bool] = True
    may_stop: ClassVar[bool] = False

    def __init__(self, at: int | None, recorder: TraceRecorder) -> None:
        self.at, self.recorder, self.boundaries = at, recorder, 0
        self.pending: tuple[dict[str, Any], int, int] | None = None
        #: ``(payload, entries before it, decisions before it)`` once accepted.
        self.taken: tuple[dict[str, Any], int, int] | None = None
        self.reentry_decisions = 0

    @property
    def name(self) -> str:
        """``conformance-snapshot``."""
        return "conformance-snapshot"

    def _observe(self, event: Event, loop: TrainingLoop) -> None:
        if loop.resuming:
            self.reentry_decisions = len(loop.decisions)
        boundary = event is Event.BATCH_END or event is Event.EPOCH_END
        if not boundary or self.at is None or self.taken is not None or not _clean(loop):
            return
        if self.boundaries == self.at:
            try:
                payload = copy.deepcopy(loop.state_dict())
            except LoopError:
                return
            self.pending = (payload, len(self.recorder.entries), len(loop.decisions))
        self.boundaries += 1

    def _guard(self, loop: TrainingLoop) -> None:
        if self.pending is not None and _clean(loop):
            self.taken = self.pending
        self.pending = None


def _clean(loop: TrainingLoop) -> bool:
    return loop.stop_reason is None and loop.failure is None


for _event in Event:
    setattr(Snapshot, f"guard_{_event.value}", Snapshot._guard)
    setattr(Snapshot, f"on_{_event.value}", functools.partialmethod(Snapshot._observe, _event))
del _event


@attrs.define
class Run:
    """What one fit of an example left: the loop, the callback, the trace, the outcome."""

    loop: TrainingLoop
    model: torch.nn.Module
    callback: CallbackLike
    entries: list[TraceEntry]
    snapshot: Snapshot
    error: Exception | None
    leaks: list[str]


def _open_files() -> Counter[str]:
    for base, linked in (("/proc/self/fd", True), ("/dev/fd", False)):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        found: Counter[str] = Counter()
        for fd in names:
            try:
                found[os.readlink(os.path.join(base, fd))] += 1
            except OSError:  # the listing's own descriptor, closed by now; or BSD's /dev/fd
                if not linked:
                    found[f"fd {fd}"] += 1
        return found
    return Counter()


def _leaks(files: Counter[str], threads: set[threading.Thread]) -> list[str]:
    deadline = time.monotonic() + 0.25  # a thread told to stop at fit_end may still be exiting
    started = [t for t in threading.enumerate() if t not in threads]
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    leaks = [f"open file {path}" for path in (_open_files() - files).elements()]
    return leaks + [f"running thread {t.name!r}" for t in started if t.is_alive()]


def fit(factory: Factory, example: Example, payload: dict[str, Any] | None = None) -> Run:
    """Fit ``example`` with a fresh ``factory()`` callback; from ``payload`` if given."""
    callback, recorder, raised = factory(), KitRecorder(), list[ScriptedError]()
    others: list[CallbackLike] = [
        ResumableScripted(slot, example.script, raised=raised) for slot in range(SLOTS)
    ]
    others.insert(example.position, callback)
    snapshot = Snapshot(None if payload is not None else example.checkpoint_at, recorder)
    loop, model = tiny_loop(example.shape, [recorder, *others, snapshot], example.engine)
    files, threads = _open_files(), set(threading.enumerate())
    error: Exception | None = None
    try:
        loop.fit(model, example.shape.epochs, resume=payload)
    except Exception as exc:
        error = exc
    return Run(loop, model, callback, recorder.entries, snapshot, error, _leaks(files, threads))


def entry_view(entry: TraceEntry) -> tuple[Any, ...]:
    """What a resumed trace must repeat of an entry; a stop's wording may hold a time."""
    return (*attrs.astuple(entry, recurse=False)[:6], entry.stop_reason is not None, entry.failed)


def decision_view(record: DecisionRecord) -> tuple[Any, ...]:
    """What a resumed fit must repeat of a decision (not its reason's wording)."""
    return (record.event.value, record.callback, record.kind.value, record.applied,
            record.ignored_because, record.epoch_index, record.batch_index)  # fmt: skip


def same(a: object, b: object) -> bool:
    """Deep equality for state dicts: tensors by dtype, shape and value, ``nan`` equal to itself."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        inexact = a.is_floating_point() or a.is_complex()
        return bool(torch.allclose(a, b, 0, 0, equal_nan=True) if inexact else torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b)


#: The sweep's fit: two epochs, so resumes cross an epoch; a validation batch, so both phases.
SWEEP_SHAPE = RunShape(epochs=2, training_batches=2, validation_batches=1)
#: Smaller shapes tried, smallest first, when a sweep example fails.
SMALLER_SHAPES = tuple(
    RunShape(e, t, v) for e in (1, 2) for t in (1, 2) for v in (0, 1) if (e, t, v) != (2, 2, 1)
)
#: Where each start event is proposed in the sweep's fit, on its first (or third) call.
_PROPOSED_IN = {
    (Event.EPOCH_START, 1): "fit",
    (Event.TRAINING_START, 1): "epoch",
    (Event.VALIDATION_START, 1): "trained",
    (Event.BATCH_START, 1): "training",
    (Event.BATCH_START, 3): "validation",
    (Event.UPDATE_START, 1): "training_batch",
    (Event.INFERENCE_PREDICTION_END, 1): "validation_batch",
}


def _actions(hook: str, event: Event, occurrence: int) -> list[tuple[int, Action]]:
    """``(rank, action)``: the sweep runs vetoes and redirects first, then stops, then raises."""
    reason = f"kit {hook} {event.value} #{occurrence}"
    actions: list[tuple[int, Action]] = [(2, Stop(reason)), (3, Raise(reason))]
    if hook == "guard" and event in START_EVENTS:
        targets = REDIRECT_TARGETS.get((_PROPOSED_IN.get((event, occurrence), ""), event), ())
        actions += [(0, Veto(reason)), *((1, Redirect(target, reason)) for target in targets)]
    return actions


def sweep(engines: Sequence[EngineName], resume: bool) -> list[Example]:
    """Every legal decision, a stop and a raise, from a guard and an observer, at every event.

    On :data:`SWEEP_SHAPE`, each at the event's first call (batch events also at the
    third: the first validation batch), each alone: vetoes and redirects first, then
    stops, then raises, the way of a user's everyday runs. The user's position, the
    engine and the checkpoint rotate. Preceded by plain fits with and without validation.
    """
    ranked = [
        (rank, ScriptStep(0, hook, event, occurrence, action))
        for event in Event
        for occurrence in ((1, 3) if event in (Event.BATCH_START, Event.BATCH_END) else (1,))
        for hook in _HOOKS
        for rank, action in _actions(hook, event, occurrence)
    ]
    steps = [step for _, step in sorted(ranked, key=lambda ranked_step: ranked_step[0])]
    plain = [Example(RunShape(1, 1, 0), engine=engines[0]), Example(SWEEP_SHAPE, engine=engines[0])]
    return plain + [
        Example(
            SWEEP_SHAPE,
            (step,),
            position=index % (SLOTS + 1),
            engine=engines[index % len(engines)],
            checkpoint_at=index % 8 if resume else None,
        )
        for index, step in enumerate(steps)
    ]


def smaller_variants(example: Example) -> list[Example]:
    """Variants of a failed sweep example, smallest first, up to (not with) itself.

    They drop the script, resume earlier or not at all, take smaller shapes and put
    the callback first, so the first that fails the same way is the one to report.
    """
    last = -1 if example.checkpoint_at is None else example.checkpoint_at
    variants = sorted(
        {
            attrs.evolve(example, shape=shape, script=script, checkpoint_at=at, position=position)
            for script in ((), example.script)
            for at in (None, *range(last + 1))
            for shape in (*SMALLER_SHAPES, example.shape)
            for position in (0, example.position)
        },
        key=lambda v: (
            len(v.script),
            v.checkpoint_at is not None,
            v.shape.epochs * (v.shape.training_batches + v.shape.validation_batches),
            v.shape.epochs,
            v.checkpoint_at or 0,
            v.position,
            attrs.astuple(v.shape),
        ),
    )
    return variants[: variants.index(example)]


def _action(action: Veto | Redirect | Stop | Raise) -> str:
    if isinstance(action, Redirect):
        return f"Redirect(Event.{action.event.name}, {action.reason!r})"
    text = action.message if isinstance(action, Raise) else action.reason
    return f"{type(action).__name__}({text!r})"


def _factory_source(factory: Factory) -> tuple[list[str], str]:
    """Import lines and an expression that name ``factory`` in a snippet."""
    if isinstance(factory, functools.partial):
        imports, inner = _factory_source(factory.func)
        args = [repr(a) for a in factory.args] + [f"{k}={v!r}" for k, v in factory.keywords.items()]
        return ["import functools", *imports], f"functools.partial({', '.join([inner, *args])})"
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", "<unknown>")
    if module is None or "<" in qualname:
        return [f"factory = ...  # not importable; rebuild your factory: {factory!r}"], "factory"
    if module == "__main__":
        return [f"# {qualname} is defined in your script (__main__)"], qualname
    return [f"from {module} import {qualname.split('.')[0]}"], qualname


def snippet(factory: Factory, example: Example, problem: str = "") -> str:
    """Python code that reruns ``example`` through ``check_example`` with ``factory``."""
    imports, ref = _factory_source(factory)
    actions = {type(step.action).__name__ for step in example.script}
    core = sorted(actions - {"Raise"} | ({"Event"} if actions else set()))
    strategies = ["Raise"] * ("Raise" in actions) + ["RunShape"] + ["ScriptStep"] * bool(actions)
    steps = [
        f"        ScriptStep({s.slot}, {s.hook!r}, Event.{s.event.name}, {s.occurrence}, "
        f"{_action(s.action)}{', after_stop=True' if s.after_stop else ''}),"
        for s in example.script
    ]
    lines = [
        *([f"from statemachine_loop import {', '.join(core)}"] if core else []),
        "from statemachine_loop.testing.conformance import Example, check_example",
        f"from statemachine_loop.testing.strategies import {', '.join(strategies)}",
        *imports,
        "",
        "example = Example(",
        f"    shape={example.shape!r},",
        *(["    script=[", *steps, "    ],"] if steps else []),
        f"    position={example.position},",
        f"    engine={example.engine!r},",
        f"    checkpoint_at={example.checkpoint_at!r},",
        ")",
        f"check_example({ref}, example)"
        + (f"  # raises ConformanceError [{problem}]" if problem else ""),
    ]
    return "\n".join(lines)

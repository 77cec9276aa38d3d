"""Invariant 7 of lifecycle.md: a resumed run continues the interrupted one exactly.

Shaped like ignite's ``test_resume_with_max_iters``: run straight through while a hook
copies ``loop.state_dict()`` at one boundary; in a fresh world (model, optimizer and
loaders built the same way, global generators scrambled) ``fit(resume=payload)``. The
resumed trace must start with ``fit_start`` and the start events of the scopes open at
the checkpoint (worked out from the straight trace), all with ``loop.resuming`` true,
then equal the straight trace from the checkpoint on, entry by entry, over the same
batches; final parameters bit-for-bit equal. Hypothesis picks shape, shuffling and split
point; the model has dropout, so a wrong random state shows in the weights.
"""

from __future__ import annotations

import copy
import math
import random
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from statemachine_loop import Callback, ConfigError, Event, LifecycleError, TrainingLoop, Veto
from statemachine_loop.callback import collect_hooks
from statemachine_loop.resume import InexactResumeWarning
from statemachine_loop.testing import TraceEntry, TraceRecorder
from statemachine_loop.testing.strategies import RunShape, run_shapes

E = Event
ENGINES = ("compiled", "transitions")
SCOPE_END = {E.FIT_START: E.FIT_END, E.EPOCH_START: E.EPOCH_END, E.BATCH_START: E.BATCH_END}
SCOPE_END |= {E.TRAINING_START: E.TRAINING_END, E.VALIDATION_START: E.VALIDATION_END}
FEATURES, HIDDEN, CLASSES, BATCH = 3, 8, 3, 4
#: Where a checkpoint may be taken: (hook, event, phase it counts in; None: any).
BOUNDARIES = {
    "training batch_end": ("on", E.BATCH_END, "training"),
    "validation batch_end": ("on", E.BATCH_END, "validation"),
    "epoch_end": ("on", E.EPOCH_END, None),
}


# -- the world: data, model, optimizer, loop; rebuilt identically for the resumed run ----


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs plus fresh noise from the global generator on every fetch."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i] + 0.1 * torch.randn(FEATURES), self.targets[i]


def make_data(batches: int, data: str, seed: int, augment: bool = False) -> Any:
    """``batches`` batches (the last one short): ``data`` is ``"seeded"`` (shuffled with
    the loader's own generator), ``"unseeded"`` (shuffled from the global one) or ``"list"``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(BATCH * batches - 1, FEATURES, generator=generator)
    targets = torch.randint(0, CLASSES, (len(inputs),), generator=generator)
    if data == "list":
        return [
            (inputs[i : i + BATCH], targets[i : i + BATCH]) for i in range(0, len(inputs), BATCH)
        ]
    dataset = Augmented(inputs, targets) if augment else TensorDataset(inputs, targets)
    own = torch.Generator().manual_seed(seed + 100) if data == "seeded" else None
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=own)


@attrs.define
class World:
    loop: TrainingLoop
    model: torch.nn.Module
    recorder: TraceRecorder
    batches: list[torch.Tensor]  # the inputs of every batch taken, in order


def build_world(
    shape: RunShape,
    engine: str = "compiled",
    data: str = "seeded",
    callbacks: Sequence[Any] = (),
    *,
    augment: bool = False,
    hidden: int = HIDDEN,
    training: Any = None,
) -> World:
    """A loop over ``shape`` with ``callbacks``, then the recorders; init from the global RNG."""
    nn = torch.nn
    model = nn.Sequential(nn.Linear(FEATURES, hidden), nn.Dropout(0.5), nn.Linear(hidden, CLASSES))
    batches: list[torch.Tensor] = []

    def log_batch(loop: TrainingLoop, event: Event) -> None:
        if event is E.BATCH_START:
            batches.append(loop.last_step_input.clone())

    recorder = TraceRecorder()
    loop = TrainingLoop(
        training=make_data(shape.training_batches, data, 1, augment)
        if training is None
        else training,
        validation=make_data(shape.validation_batches, data, 2) if shape.has_validation else None,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy"],
        callbacks=[*callbacks, log_batch, recorder],
        engine=engine,  # type: ignore[arg-type]
        progress=False,
    )
    return World(loop, model, recorder, batches)


def scramble_global_rng(seed: int) -> None:
    """Put every global generator somewhere the straight run never was."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class Snapshot(Callback):
    """Copies ``loop.state_dict()`` at the ``n``-th (0-based) call of a boundary's hook.

    A fit callback, so it runs after the world's recorders: the straight run "from the
    checkpoint on" is ``entries[cut:]`` and ``batches[batch_cut:]``.
    """

    def __init__(self, world: World, boundary: str, n: int) -> None:
        hook, event, self.phase = BOUNDARIES[boundary]
        self.world, self.n, self.calls = world, n, 0
        self.payload: dict[str, Any] = {}
        self.cut = self.batch_cut = -1
        setattr(self, f"{hook}_{event.value}", self._take)

    def _take(self, loop: TrainingLoop) -> None:
        if self.phase is not None and loop.is_training != (self.phase == "training"):
            return
        if self.calls == self.n:
            # Deep copy: the payload holds the live parameters and optimizer tensors.
            self.payload = copy.deepcopy(loop.state_dict())
            self.cut, self.batch_cut = len(self.world.recorder.entries), len(self.world.batches)
        self.calls += 1


@attrs.frozen
class Outcome:
    straight: World
    resumed: World
    snapshot: Snapshot


def straight_then_resumed(
    shape: RunShape,
    engine: str,
    boundary: str,
    n: int,
    *,
    scramble: int = 12345,
    extra: Callable[[], Sequence[Any]] = tuple,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **world: Any,
) -> Outcome:
    """Run ``shape`` straight through with a snapshot at ``boundary`` #``n``, then resume it."""
    torch.manual_seed(0)  # the straight run's model init, shuffles and dropout
    straight = build_world(shape, engine, callbacks=extra(), **world)
    snapshot = Snapshot(straight, boundary, n)
    straight.loop.fit(straight.model, shape.epochs, callbacks=[snapshot])
    assert snapshot.payload, "the boundary never occurred"
    payload = copy.deepcopy(snapshot.payload)
    if edit is not None:
        edit(payload)
    scramble_global_rng(scramble)
    resumed = build_world(shape, engine, callbacks=extra(), **world)
    resumed.loop.fit(resumed.model, shape.epochs, resume=payload)
    return Outcome(straight, resumed, snapshot)


def open_starts(prefix: Sequence[TraceEntry]) -> list[TraceEntry]:
    """The start entries of the scopes ``prefix`` leaves open, outermost first."""
    stack: list[TraceEntry] = []
    for entry in prefix:
        if entry.event in SCOPE_END:
            stack.append(entry)
        elif entry.event in SCOPE_END.values():
            assert SCOPE_END[stack.pop().event] is entry.event
    return stack


def reentry_view(entry: TraceEntry) -> tuple[Any, ...]:
    """What a re-entered start repeats of the original (the phase flag only for phases)."""
    if entry.event is E.FIT_START:
        return (entry.event, entry.state)
    phase = entry.is_training if entry.event in (E.TRAINING_START, E.VALIDATION_START) else None
    return (entry.event, entry.state, entry.epoch_index, phase, entry.stop_reason)


def assert_history_close(expected: Any, actual: Any) -> None:
    # Built-in metrics fold their per-batch buffer in chunks; a mid-phase checkpoint
    # folds early, so the resumed phase sums the same float64 terms grouped differently
    # and may differ in the last bits. Anything beyond rounding is a real difference.
    for phase in ("training", "validation"):
        want, got = getattr(expected, phase), getattr(actual, phase)
        assert len(want) == len(got), phase
        for a, b in zip(want, got, strict=True):
            assert a.keys() == b.keys() and a["epoch"] == b["epoch"]
            assert all(math.isclose(a[k], b[k], rel_tol=1e-12) for k in a), (phase, a, b)


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def assert_exact_resume(outcome: Outcome) -> None:
    snap, resumed = outcome.snapshot, outcome.resumed
    straight = outcome.straight.recorder.entries
    reentered = open_starts(straight[: snap.cut])
    k = len(reentered)
    got = resumed.recorder.entries
    assert [e.event for e in got[:k]] == [e.event for e in reentered], got[: k + 2]
    assert all(entry.resuming for entry in got[:k])
    assert [reentry_view(e) for e in got[:k]] == [reentry_view(e) for e in reentered]
    rest, want = got[k:], straight[snap.cut :]
    assert rest == want
    assert not any(entry.resuming for entry in straight)
    want_batches = outcome.straight.batches[snap.batch_cut :]
    assert len(resumed.batches) == len(want_batches)
    assert all(map(torch.equal, resumed.batches, want_batches)), "other batches were seen"
    assert same_parameters(outcome.straight.model, resumed.model)
    assert_history_close(outcome.straight.loop.history, resumed.loop.history)
    assert (resumed.loop.resumed_from, resumed.loop.resuming) == ("<memory>", False)


# -- invariant 7, Hypothesis choosing everything ----------------------------------------


def boundary_ns(shape: RunShape, boundary: str) -> list[int]:
    """Every ``n`` at which ``boundary`` occurs in an ordinary run of ``shape``."""
    e, t, v = shape.epochs, shape.training_batches, shape.validation_batches
    return list(range(e * {"training": t, "validation": v, None: 1}[BOUNDARIES[boundary][2]]))


@st.composite
def split_points(draw: st.DrawFn) -> tuple[RunShape, str, int, dict[str, Any]]:
    shape = draw(run_shapes(max_epochs=3, max_training_batches=5, max_validation_batches=3))
    boundary = draw(st.sampled_from([b for b in BOUNDARIES if boundary_ns(shape, b)]))
    n = draw(st.sampled_from(boundary_ns(shape, boundary)))
    data = draw(st.sampled_from(["seeded", "unseeded", "list"]))
    augment = data != "list" and draw(st.booleans())  # random augmentation in the dataset
    world = {"data": data, "augment": augment, "scramble": draw(st.integers(1, 2**31))}
    return shape, boundary, n, world


@pytest.mark.filterwarnings("error::statemachine_loop.resume.InexactResumeWarning")
@pytest.mark.parametrize("engine", ENGINES)
@given(point=split_points())
def test_resume_anywhere_continues_exactly(
    engine: str, point: tuple[RunShape, str, int, dict[str, Any]]
) -> None:
    shape, boundary, n, world = point
    assert_exact_resume(straight_then_resumed(shape, engine, boundary, n, **world))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("hook", ["guard_batch_start", "guard_training_end"])
def test_a_checkpoint_after_a_fetch_is_refused(engine: str, hook: str) -> None:
    # Fetching a batch (or exhausting the data) draws from the data's generators; a
    # resume would draw again, so the loop refuses instead of saving an inexact state.
    class TakeTooLate(Callback):
        def __init__(self) -> None:
            self.errors: list[LifecycleError] = []

        def take(self, loop: TrainingLoop) -> None:
            with pytest.raises(LifecycleError, match="observers of batch_end or epoch_end"):
                loop.state_dict()
            self.errors.append(LifecycleError())

    taker = TakeTooLate()
    setattr(taker, hook, taker.take)
    shape = RunShape(epochs=1, training_batches=2, validation_batches=0)
    world = build_world(shape, engine, callbacks=[taker])
    world.loop.fit(world.model, 1)
    assert taker.errors, "the hook never ran"


@pytest.mark.parametrize("epochs", [2, 1])  # then epoch_start, or fit_end, follows
def test_resume_between_epochs_keeps_the_indices(epochs: int) -> None:
    shape = RunShape(epochs=epochs, training_batches=3, validation_batches=0)
    assert_exact_resume(straight_then_resumed(shape, "compiled", "epoch_end", 0))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("data", ["seeded", "unseeded", "list"])
@pytest.mark.parametrize("boundary", ["training batch_end", "validation batch_end"])
def test_checkpoint_at_the_last_batch_of_a_phase(engine: str, data: str, boundary: str) -> None:
    shape = RunShape(epochs=2, training_batches=3, validation_batches=2)
    last = 2 if boundary == "training batch_end" else 1  # the last batch of epoch 0
    outcome = straight_then_resumed(shape, engine, boundary, last, data=data)
    assert_exact_resume(outcome)
    position = outcome.snapshot.payload["position"]
    assert (position["state"], position["next_batch"]) == (boundary.split()[0], last + 1)


def test_the_checks_notice_a_wrong_random_state() -> None:
    """Resuming with the checkpoint's torch RNG replaced must diverge, or nothing is proven."""

    def wrong_rng(payload: dict[str, Any]) -> None:
        for part in (payload, *payload.get("ranks", ())):  # per process, when distributed
            if "rng" in part:
                part["rng"]["torch"] = torch.Generator().manual_seed(99).get_state()

    shape = RunShape(epochs=2, training_batches=4, validation_batches=0)
    run = straight_then_resumed(shape, "compiled", "training batch_end", 1, edit=wrong_rng)
    assert not same_parameters(run.straight.model, run.resumed.model)


def test_taking_a_state_dict_does_not_change_the_run() -> None:
    shape = RunShape(epochs=2, training_batches=4, validation_batches=2)
    run = straight_then_resumed(shape, "compiled", "training batch_end", 3, data="unseeded")
    torch.manual_seed(0)
    plain = build_world(shape, "compiled", "unseeded")
    plain.loop.fit(plain.model, shape.epochs)
    assert same_parameters(plain.model, run.straight.model)
    assert plain.recorder.entries == run.straight.recorder.entries


# -- what else a payload carries: pending gradients, callbacks' state ---------------------


class EveryOtherUpdate(Callback):
    """Gradient accumulation over pairs: veto the update of every even batch."""

    def guard_update_start(self, loop: TrainingLoop) -> Veto | None:
        return Veto("accumulate") if loop.batch_index % 2 == 0 else None


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_mid_accumulation_restores_pending_gradients(engine: str) -> None:
    shape = RunShape(epochs=2, training_batches=5, validation_batches=2)
    # Training batch_end #5 is batch 0 of epoch 1: its update was vetoed, gradients pend.
    args = (shape, engine, "training batch_end", 5)
    run = straight_then_resumed(*args, extra=lambda: [EveryOtherUpdate()])
    assert any(bool(g.abs().sum()) for g in run.snapshot.payload["phase"]["grads"].values())
    assert_exact_resume(run)
    assert {d.reason for d in run.resumed.loop.decisions} == {"accumulate"}

    def drop_grads(payload: dict[str, Any]) -> None:
        payload["phase"]["grads"] = {}

    lost = straight_then_resumed(*args, extra=lambda: [EveryOtherUpdate()], edit=drop_grads)
    assert not same_parameters(lost.straight.model, lost.resumed.model)


class BatchCounter(Callback):
    """Counts training batches; the count is resumable state."""

    def __init__(self) -> None:
        self.count = 0
        self.loaded: list[dict[str, Any]] = []

    def on_batch_end(self, loop: TrainingLoop) -> None:
        self.count += loop.is_training

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(dict(state))
        self.count = int(state["count"])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_callbacks_state_is_restored(engine: str) -> None:
    shape = RunShape(epochs=3, training_batches=3, validation_batches=1)
    run = straight_then_resumed(
        shape, engine, "training batch_end", 4, extra=lambda: [BatchCounter()]
    )
    straight, resumed = run.straight.loop.callbacks[0], run.resumed.loop.callbacks[0]
    assert isinstance(straight, BatchCounter) and isinstance(resumed, BatchCounter)
    assert run.snapshot.payload["callbacks"] == {"BatchCounter": {"count": 5}}
    assert resumed.loaded == [{"count": 5}]
    assert resumed.count == straight.count == 9
    assert_exact_resume(run)


def test_reentry_observers_see_resuming_then_not() -> None:
    shape = RunShape(epochs=2, training_batches=3, validation_batches=2)
    seen: list[tuple[Event, bool]] = []

    def observe(loop: TrainingLoop, event: Event) -> None:
        seen.append((event, loop.resuming))

    payload = straight_then_resumed(shape, "compiled", "validation batch_end", 2).snapshot.payload
    world = build_world(shape, callbacks=[observe])
    world.loop.fit(world.model, shape.epochs, resume=copy.deepcopy(payload))
    # Validation batch #2 is epoch 1's first: fit, epoch 1 and its validation are open.
    assert seen[:3] == [(E.FIT_START, True), (E.EPOCH_START, True), (E.VALIDATION_START, True)]
    assert seen[3] == (E.BATCH_START, False) and not any(flag for _, flag in seen[3:])


# -- what is refused, and what only warns ----------------------------------------------------


def test_resume_beyond_the_requested_epochs_is_refused() -> None:
    shape = RunShape(epochs=3, training_batches=2, validation_batches=0)
    mid_epoch_1 = straight_then_resumed(shape, "compiled", "training batch_end", 3).snapshot.payload
    after_epoch_1 = straight_then_resumed(shape, "compiled", "epoch_end", 1).snapshot.payload
    for payload in (mid_epoch_1, after_epoch_1):
        world = build_world(RunShape(1, 2, 0))
        with pytest.raises(ConfigError, match=r"epoch index 1 .*epochs > 1"):
            world.loop.fit(world.model, 1, resume=copy.deepcopy(payload))
        assert world.recorder.entries == []


def _refused_resume() -> tuple[ConfigError, World, list[torch.Tensor]]:
    shape = RunShape(epochs=2, training_batches=2, validation_batches=0)
    payload = straight_then_resumed(shape, "compiled", "training batch_end", 1).snapshot.payload
    world = build_world(shape, hidden=HIDDEN * 2)
    before = [p.detach().clone() for p in world.model.parameters()]
    with pytest.raises(ConfigError, match="do not fit this model") as caught:
        world.loop.fit(world.model, shape.epochs, resume=copy.deepcopy(payload))
    return caught.value, world, before


def test_a_payload_for_another_model_shape_is_a_config_error() -> None:
    error, world, _ = _refused_resume()
    assert "0.weight" in str(error) and "Nothing was loaded" in str(error)
    assert world.recorder.entries == [] and world.loop.state == "idle"


@pytest.mark.parametrize("check", ["no torch traceback", "model untouched"])
def test_a_refused_payload_leaves_no_trace(check: str) -> None:
    error, world, before = _refused_resume()
    if check == "no torch traceback":
        assert "torch/nn/modules" not in "".join(traceback.format_exception(error))
    else:  # the output layer's bias has the same shape in both models
        assert all(map(torch.equal, before, world.model.parameters()))


class Stream:
    """A re-iterable of whole batches that is neither a DataLoader nor a sequence."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


class Batches(Stream, IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """An iterable dataset of whole batches: nothing a sampler could skip."""


class SizedBatches(Batches):
    def __len__(self) -> int:
        return len(self.batches)


def _iterable(kind: str) -> Any:
    batches = make_data(4, "list", seed=1)
    if kind == "Stream":
        return Stream(batches)
    return DataLoader((SizedBatches if kind == "sized" else Batches)(batches), batch_size=None)


@pytest.mark.parametrize("kind", ["sized", "Stream"])
def test_an_iterable_without_sampler_warns_but_is_exact_when_deterministic(kind: str) -> None:
    shape = RunShape(epochs=2, training_batches=4, validation_batches=0)
    name = "DataLoader" if kind == "sized" else kind
    with pytest.warns(InexactResumeWarning, match=f"{name} that cannot skip at the sampler"):
        run = straight_then_resumed(
            shape, "compiled", "training batch_end", 5, training=_iterable(kind)
        )
    assert_exact_resume(run)


def test_an_unsized_iterable_dataset_can_be_resumed() -> None:
    shape = RunShape(epochs=2, training_batches=4, validation_batches=0)
    training = _iterable("unsized")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InexactResumeWarning)
        run = straight_then_resumed(shape, "compiled", "training batch_end", 5, training=training)
    assert_exact_resume(run)


# -- the phase start's random state is kept only where a hook can checkpoint ---------------


class _Hooks(Callback):
    """A callback whose only hook is the one named, set on the instance."""

    def __init__(self, hook: str) -> None:
        setattr(self, hook, lambda loop: None)


@pytest.mark.parametrize(
    ("hooks", "mid_phase"),
    [
        ((), False),
        (("on_fit_start", "guard_epoch_start", "on_training_start", "on_epoch_end"), False),
        (("on_training_end", "on_validation_end", "guard_validation_start"), False),
        (("on_batch_end",), True),
        (("guard_batch_end",), True),
        (("on_batch_start",), True),
        (("guard_update_start",), True),
        (("on_inference_prediction_end",), True),
        (("guard_training_end",), True),  # a wind-down proposes it at a batch boundary
        (("guard_validation_end",), True),
    ],
)
def test_which_hooks_run_mid_phase(hooks: tuple[str, ...], mid_phase: bool) -> None:
    assert collect_hooks([_Hooks(hook) for hook in hooks]).mid_phase is mid_phase
    assert collect_hooks([lambda loop, event: None]).mid_phase  # a function observes all


class _CheckpointingFetch(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Calls ``loop.state_dict()`` on fetching sample ``at``: a checkpoint from no hook."""

    def __init__(self, at: int) -> None:
        self.loop: TrainingLoop | None = None
        self.at, self.outcome = at, ""

    def __len__(self) -> int:
        return 2 * BATCH

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.at and self.loop is not None:
            try:
                payload = self.loop.state_dict()
                self.outcome = "taken" if payload["ranks"][0]["phase_rng"] else "no snapshot"
            except LifecycleError as error:
                self.outcome = str(error)
        return torch.zeros(FEATURES), torch.tensor(0)


@pytest.mark.parametrize("observer", [False, True])
def test_a_fit_with_no_mid_phase_hook_refuses_a_stray_checkpoint(observer: bool) -> None:
    # Validation runs the general loop, which marks each batch boundary; the data's
    # fetch of the second batch is one, but outside any hook.
    stray = _CheckpointingFetch(at=BATCH)
    model = torch.nn.Linear(FEATURES, CLASSES)
    loop = TrainingLoop(
        training=make_data(2, "list", seed=1),
        validation=DataLoader(stray, batch_size=BATCH),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.cross_entropy,
        callbacks=[_Hooks("on_batch_end")] if observer else [],
        progress=False,
    )
    stray.loop = loop
    loop.fit(model, 1)
    if observer:  # a hook could checkpoint there, so the snapshot exists
        assert stray.outcome == "taken"
    else:  # no silent, inexact checkpoint: the loop says why it has none
        assert "random state of the phase's start" in stray.outcome
        assert "after batch 0" in stray.outcome


class _FailingFetch(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Samples of a fixed set; the ``fail_at``-th fetch (0-based) raises, if set."""

    def __init__(self, fail_at: int | None) -> None:
        generator = torch.Generator().manual_seed(7)
        self.inputs = torch.randn(4 * BATCH, FEATURES, generator=generator)
        self.targets = torch.randint(0, CLASSES, (4 * BATCH,), generator=generator)
        self.fail_at, self.fetches = fail_at, 0

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fetches == self.fail_at:
            raise OSError("the disk went away")
        self.fetches += 1
        return self.inputs[i], self.targets[i]


class _TakeAtTrainingEnd(Callback):
    def __init__(self) -> None:
        self.payload: dict[str, Any] = {}

    def guard_training_end(self, loop: TrainingLoop) -> None:
        self.payload = copy.deepcopy(loop.state_dict())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_phase_end_guard_checkpoints_exactly_in_a_wind_down(engine: str) -> None:
    # The fit's only hook is training_end's guard. A failed fetch of batch 2 winds the
    # loop down from that batch boundary, proposing training_end there: the guard's
    # checkpoint needs the phase start's random state, and resumes exactly.
    def fit(data: _FailingFetch, callbacks: Sequence[Any], resume: Any = None) -> torch.nn.Module:
        nn = torch.nn
        model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Dropout(0.5), nn.Linear(HIDDEN, 3))
        loop = TrainingLoop(
            training=DataLoader(data, batch_size=BATCH, shuffle=True),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.functional.cross_entropy,
            callbacks=callbacks,
            engine=engine,  # type: ignore[arg-type]
            progress=False,
        )
        loop.fit(model, 2, resume=resume)
        return model

    torch.manual_seed(0)
    straight = fit(_FailingFetch(None), [])
    torch.manual_seed(0)
    taker = _TakeAtTrainingEnd()
    with pytest.raises(OSError, match="disk went away"):
        fit(_FailingFetch(2 * BATCH), [taker])
    assert taker.payload["position"]["next_batch"] == 2
    assert taker.payload["ranks"][0]["phase_rng"] is not None
    scramble_global_rng(4321)
    resumed = fit(_FailingFetch(None), [], resume=taker.payload)
    assert same_parameters(straight, resumed)

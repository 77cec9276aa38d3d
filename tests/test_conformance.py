"""The conformance kit (issue 6): it finds the bug in broken callbacks and passes the built-ins.

Each broken sample below makes one class of mistake that users make; the kit must
reject it with a :class:`ConformanceError` naming the problem, and its snippet must
rerun the minimal example. Every built-in callback must pass. ``SEED`` fixes the
examples, so a failure here reproduces.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TextIO

import pytest
import torch
from rich.console import Console

from statemachine_loop import Callback, Schedule, Segment, Stop, TrainingLoop, Veto
from statemachine_loop.callbacks import (
    Checkpoint,
    CSVLogger,
    EarlyStopping,
    GradientAccumulation,
    GradientClipping,
    LearningRateScheduler,
    MixedPrecision,
    ProgressBar,
    StopAfter,
    StructuredLogger,
    TensorBoardLogger,
    TerminateOnNaN,
)
from statemachine_loop.testing import TraceRecorder, conformance
from statemachine_loop.testing.conformance import (
    PROBLEMS,
    ConformanceError,
    Example,
    check_callback,
    check_example,
)
from statemachine_loop.testing.strategies import RunShape

pytest_plugins = ["pytester"]

SEED = 20240601
EXAMPLES = 20


# -- broken samples, one class of mistake each ------------------------------------------


class VetoesEpochEnd(Callback):
    """Tries to discard the first epoch by vetoing its end: scope ends cannot be vetoed."""

    def guard_epoch_end(self, loop: TrainingLoop) -> Veto | None:
        return Veto("warm-up epoch, not worth keeping") if loop.epoch_index == 0 else None


class BestValidationLoss(Callback):
    """Assumes validation runs every epoch: with no validation phase ``latest`` is None."""

    def __init__(self) -> None:
        self.best = math.inf
        self.latest: float | None = None

    def on_epoch_start(self, loop: TrainingLoop) -> None:
        self.latest = None

    def on_validation_end(self, loop: TrainingLoop) -> None:
        self.latest = loop.metrics["loss"]

    def on_epoch_end(self, loop: TrainingLoop) -> None:
        self.best = min(self.best, self.latest)  # type: ignore[type-var]


class GradNormLogger(Callback):
    """Assumes every training batch is an update: a vetoed ``update_start`` leaves no norm."""

    may_stop = False

    def __init__(self) -> None:
        self.norms: list[float] = []
        self._norm: torch.Tensor | None = None

    def on_update_start(self, loop: TrainingLoop) -> None:
        assert loop.model is not None
        grads = [p.grad for p in loop.model.parameters() if p.grad is not None]
        self._norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))

    def on_batch_end(self, loop: TrainingLoop) -> None:
        if loop.is_training:
            self.norms.append(float(self._norm))  # type: ignore[arg-type]
            self._norm = None


class StopAfterTwoEpochs(Callback):
    """Counts epochs but leaves the count out of its state: a resumed fit counts from 0."""

    def __init__(self, limit: int = 2) -> None:
        self.limit, self.epochs = limit, 0

    def on_epoch_end(self, loop: TrainingLoop) -> Stop | None:
        self.epochs += 1
        return Stop(f"{self.epochs} epochs") if self.epochs >= self.limit else None

    def state_dict(self) -> dict[str, Any]:
        return {"limit": self.limit}  # forgot "epochs"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.limit = state["limit"]


class EpochLineWriter(Callback):
    """Closes its file at the end of the last epoch, so a stop or a failure leaks it."""

    may_stop = False
    opened: ClassVar[list[TextIO]] = []

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.file = open(os.devnull, "w")  # noqa: SIM115 - the mistake under test
        self.opened.append(self.file)

    def on_epoch_end(self, loop: TrainingLoop) -> None:
        self.file.write(f"epoch {loop.epoch_index} done\n")
        if loop.epoch_index == loop.epoch_count - 1:
            self.file.close()


class AllowsBatches(Callback):
    """Returns True from a guard, as if guards answered "may it happen?"."""

    def guard_batch_start(self, loop: TrainingLoop) -> bool:
        return True


class TrainingAccuracy(Callback):
    """Assumes a training ``batch_end`` always follows a forward pass; the wind-down's need not."""

    may_stop = False

    def __init__(self) -> None:
        self.correct = 0

    def on_batch_end(self, loop: TrainingLoop) -> None:
        if loop.is_training:
            predicted = loop.last_step_output.argmax(1)
            self.correct += int((predicted == loop.last_step_target).sum())


class RunLogPath(Callback):
    """Keeps a ``Path`` in its state, which ``torch.load(weights_only=True)`` refuses."""

    def __init__(self) -> None:
        self.path = Path("runs") / "latest"

    def state_dict(self) -> dict[str, Any]:
        return {"path": self.path}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])


class ResetsEpochIndex(Callback):
    """Counts epochs of this fit in ``loop.epoch_index``, which the loop owns."""

    def on_training_start(self, loop: TrainingLoop) -> None:
        loop.epoch_index = 0


class Heartbeat(Callback):
    """Starts a thread at fit_start and stops it only after the last epoch."""

    may_stop = False

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.done = threading.Event()
        threading.Thread(target=self.done.wait, name="heartbeat", daemon=True).start()

    def on_epoch_end(self, loop: TrainingLoop) -> None:
        if loop.epoch_index == loop.epoch_count - 1:
            self.done.set()


BROKEN: dict[str, tuple[Callable[[], Callback], str, str]] = {
    "vetoes an end event": (VetoesEpochEnd, "illegal-decision", "scope end cannot be vetoed"),
    "assumes validation always runs": (BestValidationLoss, "raised", "TypeError"),
    "raises on a vetoed update": (GradNormLogger, "raised", "UPDATE_START"),
    "loses state on resume": (StopAfterTwoEpochs, "resume", "the trace differs"),
    "leaves a file open after a stop or failure": (EpochLineWriter, "leak", os.devnull),
    "returns a non-decision from a guard": (AllowsBatches, "illegal-decision", "returned True"),
    "crashes in the wind-down": (TrainingAccuracy, "wind-down", "AttributeError"),
    "keeps a Path in its state": (RunLogPath, "state-dict", "weights_only=True"),
    "writes the loop's epoch_index": (ResetsEpochIndex, "raised", "epoch_index"),
    "leaves a thread running": (Heartbeat, "leak", "running thread 'heartbeat'"),
}


@pytest.fixture(scope="module")
def found() -> dict[str, ConformanceError]:
    """Each broken sample's error, found once (shrinking is the slow part)."""
    errors: dict[str, ConformanceError] = {}
    for mistake, (factory, _, _) in BROKEN.items():
        try:
            check_callback(factory, max_examples=EXAMPLES * 2, seed=SEED)
        except ConformanceError as error:
            errors[mistake] = error
    for file in EpochLineWriter.opened:
        file.close()
    return errors


@pytest.mark.parametrize("mistake", BROKEN)
def test_the_kit_finds_the_mistake(mistake: str, found: dict[str, ConformanceError]) -> None:
    _, problem, hint = BROKEN[mistake]
    assert mistake in found, f"the kit passed a callback that {mistake}"
    error = found[mistake]
    message = str(error)
    assert error.problem == problem, message
    assert f"[{problem}]: {PROBLEMS[problem]}" in message
    assert hint in message, message
    assert "check_example(" in error.snippet and error.snippet in message.replace("\n    ", "\n")


@pytest.mark.parametrize("mistake", BROKEN)
def test_the_snippet_reruns_the_minimal_example(
    mistake: str, found: dict[str, ConformanceError]
) -> None:
    assert mistake in found, f"the kit passed a callback that {mistake}"
    error = found[mistake]
    namespace: dict[str, Any] = {}
    with pytest.raises(ConformanceError) as info:
        exec(error.snippet, namespace)
    assert info.value.problem == error.problem
    assert info.value.example == error.example
    for file in EpochLineWriter.opened:
        file.close()


def test_a_resume_mismatch_names_where_it_resumed() -> None:
    example = Example(RunShape(epochs=3, training_batches=1, validation_batches=0), checkpoint_at=1)
    with pytest.raises(ConformanceError, match=r"resumed from a checkpoint taken after"):
        check_example(StopAfterTwoEpochs, example)


def test_the_minimal_example_is_small(found: dict[str, ConformanceError]) -> None:
    example = found["assumes validation always runs"].example
    assert example.shape == RunShape(epochs=1, training_batches=1, validation_batches=0)
    assert example.script == ()


def test_a_failure_that_does_not_repeat_is_called_nondeterministic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = iter(range(1000))

    class Sometimes(Callback):
        def on_epoch_end(self, loop: TrainingLoop) -> None:
            if next(calls) % 7 == 3:
                raise RuntimeError("every seventh epoch")

    monkeypatch.setattr(conformance, "sweep", lambda engines, resume: [])
    with pytest.raises(ConformanceError) as info:
        check_callback(Sometimes, max_examples=EXAMPLES, seed=SEED)
    assert info.value.problem == "nondeterministic"
    assert "every seventh epoch" in str(info.value)


def test_a_callback_that_conforms_passes_quickly() -> None:
    check_callback(TraceRecorder, max_examples=5, resume=False, seed=SEED)


# -- the pytest plugin ---------------------------------------------------------------------


def _plugin_args() -> list[str]:
    """Load the plugin by module unless its entry point is installed (then it loads itself)."""
    module = "statemachine_loop.testing.pytest_plugin"
    installed = any(ep.value == module for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", module]


def test_the_pytest_plugin_gives_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from statemachine_loop import Callback, Veto
        from statemachine_loop.testing.conformance import ConformanceError

        class VetoesFitEnd(Callback):
            def guard_fit_end(self, loop):
                return Veto("not yet")

        def test_tiny_loop(tiny_loop):
            loop, model = tiny_loop()
            assert len(loop.fit(model, 2).validation) == 2

        def test_the_option_sets_the_examples(request):
            assert request.config.getoption("callback_examples") == 2

        def test_check_callback(check_callback):
            check_callback(Callback, resume=False)
            with pytest.raises(ConformanceError, match="illegal-decision"):
                check_callback(VetoesFitEnd, seed=1)
        """
    )
    result = pytester.runpytest(*_plugin_args(), "--callback-examples=2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_plugin_imports_without_hypothesis() -> None:
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import statemachine_loop.testing.pytest_plugin as plugin\n"
        "try:\n"
        "    plugin._require_hypothesis('check_callback')\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("MissingDependencyError The check_callback fixture needs")


# -- every built-in callback passes -------------------------------------------------------


def _builtins(tmp: Path) -> dict[str, Callable[[], object]]:
    return {
        "TraceRecorder": TraceRecorder,
        "EarlyStopping": lambda: EarlyStopping("training/loss", patience=1),
        "GradientAccumulation": lambda: GradientAccumulation(2),
        "GradientClipping": lambda: GradientClipping(max_norm=1.0),
        "LearningRateScheduler": lambda: LearningRateScheduler(
            Schedule([Segment("linear", start=0.1, end=0.01)])
        ),
        "MixedPrecision": lambda: MixedPrecision(torch.bfloat16),
        "StopAfter": lambda: StopAfter(steps=3),
        "TerminateOnNaN": TerminateOnNaN,
        "Checkpoint": lambda: Checkpoint(tmp / "checkpoints", handle_preemption=False),
        "Checkpoint(preemption, batches)": lambda: Checkpoint(
            tmp / "checkpoints", every_n_batches=2, handle_preemption=True
        ),
        "ProgressBar": lambda: ProgressBar(Console(file=io.StringIO())),
        "CSVLogger": lambda: CSVLogger(tmp / "log.csv", flush_every=0.001),
        "TensorBoardLogger": lambda: TensorBoardLogger(tmp / "tensorboard", flush_every=0.001),
        "StructuredLogger": lambda: StructuredLogger(tmp / "events.jsonl", level="debug"),
    }


@pytest.mark.parametrize("name", list(_builtins(Path())))
def test_every_builtin_callback_conforms(name: str, tmp_path: Path) -> None:
    factory = _builtins(tmp_path)[name]
    check_callback(factory, max_examples=EXAMPLES, engines=("compiled", "transitions"), seed=SEED)

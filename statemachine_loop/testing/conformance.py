"""The conformance kit: run a user's callback through every lifecycle the loop can produce.

:func:`check_callback` builds the callback afresh (``factory()``) for every example
and runs it inside a tiny real fit (:func:`~.strategies.tiny_loop`) among two
scripted callbacks that veto, redirect, stop and raise. It runs a deterministic
sweep first (every decision, stop and raise at every event, alone), then random
examples (:func:`~.strategies.run_shapes`, :func:`~.strategies.decision_scripts`)
that Hypothesis shrinks on failure. With ``checkpoint_at`` set, ``loop.state_dict()``
is copied at that exact boundary and a fresh fit with a fresh callback resumes from
the copy. Every example must pass, in this order:

* ``illegal-decision``: the callback returns only what its hook may (no veto or
  redirect of a scope end, legal redirect targets, ``Veto | Redirect | Stop | None``
  from guards, ``Stop`` from observers only with ``may_stop``, no refused re-entry);
* ``raised`` / ``wind-down``: it raises nothing, in the fit or while the loop winds
  down after a stop or a failure (such errors become notes or come after ``fit_end``);
* ``invalid-trace``: the trace a ``TraceRecorder`` placed first keeps the invariants;
* ``leak``: every file descriptor and thread it opened is closed by ``fit_end``;
* ``state-dict``: its state survives ``torch.load(weights_only=True)`` and
  ``load_state_dict(state_dict())`` on a fresh instance gives the same state;
* ``resume``: after the re-entry events the resumed fit's trace, decisions, outcome
  and parameters equal the uninterrupted fit's from the checkpoint on;
* ``nondeterministic``: a random example that failed fails again when rerun.

A failure is a :class:`ConformanceError` that shows the minimal example as a snippet
rerunning it through :func:`check_example`.
"""

from __future__ import annotations

import copy
import io
import re
import traceback
from collections.abc import Sequence

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure

from statemachine_loop.callback import Callback, callback_name, collect_hooks
from statemachine_loop.decisions import DecisionKind
from statemachine_loop.errors import ConflictingDecisionsError, LifecycleError
from statemachine_loop.events import END_EVENTS
from statemachine_loop.testing._conformance_run import (
    SLOTS,
    EngineName,
    Example,
    Factory,
    Run,
    decision_view,
    entry_view,
    fit,
    same,
    smaller_variants,
    snippet,
    sweep,
)
from statemachine_loop.testing.strategies import ScriptedError, decision_scripts, run_shapes
from statemachine_loop.trace import TraceEntry, TraceViolation, assert_valid_trace

__all__ = ["PROBLEMS", "ConformanceError", "Example", "check_callback", "check_example"]

#: Every problem the kit reports, by the key a :class:`ConformanceError` names.
PROBLEMS: dict[str, str] = {
    "illegal-decision": "it returned something its hook may not return there",
    "raised": "it raised an exception during the fit",
    "wind-down": "it raised while the loop wound down after a stop or a failure",
    "invalid-trace": "the fit's trace broke the lifecycle invariants",
    "leak": "it left files or threads open after fit_end",
    "state-dict": "its state_dict() fails, or does not survive saving and loading",
    "resume": "a fit resumed from a checkpoint did not continue as the uninterrupted one",
    "nondeterministic": "the same example failed once and passed when run again",
}
_SCRIPTED = re.compile(r"(?:Callback |of |')scripted\d")


class ConformanceError(AssertionError):
    """A callback failed the conformance kit; the message shows a runnable minimal example.

    ``problem`` is a key of :data:`PROBLEMS`, ``name`` the callback's, ``detail`` what
    was seen, ``example`` the :class:`Example` it happened in and ``snippet`` Python
    code that reruns it.
    """

    def __init__(self, problem: str, detail: str, *, name: str, example: Example, snippet: str):
        self.problem, self.detail, self.example, self.snippet = problem, detail, example, snippet
        self.name = name
        indented = "\n".join(f"    {line}" if line else "" for line in snippet.splitlines())
        super().__init__(
            f"{name} failed the conformance check [{problem}]: {PROBLEMS[problem]}.\n"
            f"{detail}\n\nMinimal example; paste this to rerun it:\n\n{indented}\n"
        )


def _hook_of(error: BaseException) -> str:
    hooks = [f.name for f in traceback.extract_tb(error.__traceback__)]
    hooks = [h for h in hooks if h.startswith(("guard_", "on_")) or h.endswith("state_dict")]
    return f" in {hooks[-1]}" if hooks else ""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _Checker:
    """Runs one example and turns the first problem into a :class:`ConformanceError`."""

    def __init__(self, factory: Factory, example: Example) -> None:
        self.factory, self.example = factory, example
        self.name = "the callback"

    def fail(self, problem: str, detail: str, run: Run | None = None) -> ConformanceError:
        context = "" if run is None else "\n" + self.context(run)
        error = ConformanceError(
            problem, detail + context, name=self.name, example=self.example,
            snippet=snippet(self.factory, self.example, problem),
        )  # fmt: skip
        if run is not None and run.error is not None and problem in ("raised", "wind-down"):
            error.__cause__ = run.error
        return error

    def context(self, run: Run) -> str:
        shape = self.example.shape
        lines = [
            f"  fit: {shape.epochs} epoch(s), {shape.training_batches} training and "
            f"{shape.validation_batches} validation batch(es) per epoch"
            + ("" if shape.has_validation else " (no validation data)")
        ]
        for record in [r for r in run.loop.decisions if r.applied][:6]:
            target = f" -> {record.target.value}" if record.target else ""
            lines.append(
                f"  {record.callback} decided {record.kind.value}{target} at "
                f"{record.event.value} (epoch {record.epoch_index}, batch {record.batch_index})"
            )
        ended = [f"stopped ({run.loop.stop_reason})"] if run.loop.stop_reason else []
        ended += [f"raised {_describe(run.error)}"] if run.error else []
        lines.append(f"  ended: {', '.join(ended) or 'normally'}")
        tail = [e.event.value for e in run.entries[-10:]]
        shown = ("... " if len(run.entries) > 10 else "") + " ".join(tail)
        lines.append(f"  trace: {shown or '(empty: fit_start was not taken)'}")
        return "\n".join(lines)

    def run(self) -> None:
        straight = fit(self.factory, self.example)
        self.name = callback_name(straight.callback)
        self.check_run(straight, "the fit", first_epoch=0)
        self.check_state(straight)
        taken = straight.snapshot.taken
        if taken is not None:
            payload = taken[0]
            resumed = fit(self.factory, self.example, copy.deepcopy(payload))
            epoch = int(payload["position"]["epoch_index"])
            self.check_run(resumed, "the resumed fit", first_epoch=epoch)
            self.compare(straight, resumed)

    def check_run(self, run: Run, label: str, *, first_epoch: int) -> None:
        name, error = self.name, run.error
        notes = getattr(error, "__notes__", [])
        for note in notes:
            if f" {name} also raised at " in note:
                lifecycle = re.search(r"(Lifecycle|IllegalRedirect)Error: ", note)
                kind = "illegal-decision" if lifecycle else "raised"
                kind = "wind-down" if not lifecycle and note.startswith("During") else kind
                raise self.fail(kind, f"In {label}: {note}", run)
        if error is not None and not isinstance(error, ScriptedError | ConflictingDecisionsError):
            message = str(error)
            blamed = f"Callback {name} " in message or f" of {name} returned" in message
            if isinstance(error, LifecycleError) and (blamed or "Resuming needs" in message):
                raise self.fail("illegal-decision", f"In {label}: {_describe(error)}", run)
            if not (isinstance(error, LifecycleError) and _SCRIPTED.search(message)):
                kind = "raised" if run.loop.stop_reason is None else "wind-down"
                when = "" if kind == "raised" else " after the stop, during the wind-down"
                detail = f"In {label}{when}, {_describe(error)} was raised{_hook_of(error)}."
                raise self.fail(kind, detail, run)
        for record in run.loop.decisions:
            ended = record.event in END_EVENTS and record.kind is not DecisionKind.STOP
            if record.callback == name and ended:
                detail = (
                    f"In {label}, {name} returned {record.kind.value} on the scope end "
                    f"{record.event.value!r} (ignored only because the loop was winding "
                    "down); scope ends allow only Stop."
                )
                raise self.fail("illegal-decision", detail, run)
        try:
            shape = self.example.shape
            assert_valid_trace(
                run.entries,
                has_validation=shape.has_validation,
                epoch_count=shape.epochs,
                first_epoch=first_epoch,
            )
        except TraceViolation as violation:
            raise self.fail("invalid-trace", f"In {label}: {violation}", run) from None
        if run.leaks:
            detail = f"After {label} returned or raised: " + ", ".join(run.leaks) + "."
            raise self.fail("leak", detail, run)

    def check_state(self, run: Run) -> None:
        callback = run.callback
        if not isinstance(callback, Callback):
            return
        try:
            states = [("at the end of the fit", callback.state_dict())]
        except Exception as error:
            fit_ran = " whose fit_start was not taken" * (not run.entries)
            detail = (
                f"state_dict() raised {_describe(error)} after a fit{fit_ran}; it must work "
                "whenever it is called, before any fit too (set its fields in __init__)."
            )
            raise self.fail("state-dict", detail, run) from error
        if run.snapshot.taken is not None:
            saved = run.snapshot.taken[0]["callbacks"].get(callback.name)
            states.insert(0, ("at the checkpoint", saved or {}))
        for where, state in states:
            try:
                buffer = io.BytesIO()
                torch.save(state, buffer)
                buffer.seek(0)
                loaded = torch.load(buffer, weights_only=True)
            except Exception as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                detail = (
                    f"Its state_dict() {where} is not plain data that torch.load("
                    f"weights_only=True) reads back ({type(error).__name__}: {first}); "
                    f"use tensors, numbers, strings, lists and dicts. The state: {_short(state)}"
                )
                raise self.fail("state-dict", detail, run) from None
            fresh = self.factory()
            assert isinstance(fresh, Callback)
            try:
                fresh.load_state_dict(loaded)
                again = fresh.state_dict()
            except Exception as error:
                detail = f"load_state_dict(state_dict() {where}) on a fresh instance raised"
                raise self.fail("state-dict", f"{detail} {_describe(error)}.", run) from error
            if not same(again, state):
                detail = (
                    f"load_state_dict(state_dict() {where}) on a fresh instance gives the state "
                    f"{_short(again)}, not {_short(state)}."
                )
                raise self.fail("state-dict", detail, run)

    def compare(self, straight: Run, resumed: Run) -> None:
        assert straight.snapshot.taken is not None
        saved, cut, decided = straight.snapshot.taken
        entries = resumed.entries
        reentered = next((i for i, e in enumerate(entries) if not e.resuming), len(entries))
        want = [entry_view(e) for e in straight.entries[cut:]]
        got = [entry_view(e) for e in resumed.entries[reentered:]]
        where = (
            f"resumed from a checkpoint taken after event #{cut - 1} "
            f"({straight.entries[cut - 1].event.value})"
        )
        problems: list[str] = []
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
            at = min(len(want), len(got)) if at is None else at
            problems.append(
                f"the trace differs from event #{cut + at} on: uninterrupted "
                f"{_events(straight.entries[cut + at :])}, resumed "
                f"{_events(resumed.entries[reentered + at :])}"
            )
        decisions = [decision_view(r) for r in straight.loop.decisions[decided:]]
        after = [
            decision_view(r) for r in resumed.loop.decisions[resumed.snapshot.reentry_decisions :]
        ]
        if not problems and decisions != after:
            problems.append(f"the decisions differ: uninterrupted {decisions}, resumed {after}")
        if type(straight.error) is not type(resumed.error):
            ended = [type(r.error).__name__ if r.error else "None" for r in (straight, resumed)]
            problems.append(f"the uninterrupted fit raised {ended[0]}, the resumed one {ended[1]}")
        parameters = zip(straight.model.parameters(), resumed.model.parameters(), strict=True)
        if not all(torch.equal(a, b) for a, b in parameters):
            problems.append("the final parameters differ")
        if problems:
            state = saved["callbacks"].get(self.name, {})
            detail = (
                f"The fit {where}: " + "; ".join(problems) + ". "
                f"The callback's state at the checkpoint was {_short(state)}."
            )
            raise self.fail("resume", detail, straight)


def _events(entries: Sequence[TraceEntry]) -> str:
    flags = [" (resuming)" * e.resuming + " (stopped)" * bool(e.stop_reason) for e in entries]
    shown = ", ".join(f"{e.event.value}{flag}" for e, flag in zip(entries[:6], flags, strict=False))
    return f"[{shown}{', ...' if len(entries) > 6 else ''}]"


def _short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_example(factory: Factory, example: Example) -> None:
    """Run the kit's checks on one :class:`Example`; raise :class:`ConformanceError` on a problem.

    This is what :func:`check_callback` runs per Hypothesis example, and what the
    snippet in its failure message calls, so a failure can be rerun and debugged alone.
    """
    _Checker(factory, example).run()


def _examples(engines: Sequence[EngineName], resume: bool) -> st.SearchStrategy[Example]:
    return st.builds(
        Example,
        shape=run_shapes(),
        script=decision_scripts(slots=SLOTS),
        position=st.integers(0, SLOTS),
        engine=st.sampled_from(list(engines)),
        # Two branches of boundaries, so most examples resume; shrinking prefers none.
        checkpoint_at=st.none() | st.integers(0, 8) | st.integers(0, 3) if resume else st.none(),
    )


def _smallest(factory: Factory, error: ConformanceError) -> ConformanceError:
    """The smallest variant of a failed sweep example that fails the same way."""
    for variant in smaller_variants(error.example):
        try:
            check_example(factory, variant)
        except ConformanceError as found:
            if found.problem == error.problem:
                return found
    return error


def _flaky(factory: Factory, flaky: FlakyFailure) -> BaseException:
    """A failure that did not repeat: the callback depends on more than the lifecycle."""
    first = next((e for e in flaky.exceptions if isinstance(e, ConformanceError)), None)
    if first is None:
        return flaky
    detail = (
        "It failed, then passed when the same example ran again: it depends on more than "
        "the lifecycle (the clock, global or class-level state, an earlier fit). The failure "
        f"was [{first.problem}]:\n{first.detail}"
    )
    return ConformanceError(
        "nondeterministic", detail, name=first.name, example=first.example,
        snippet=snippet(factory, first.example, "nondeterministic"),
    )  # fmt: skip


def check_callback(
    factory: Factory,
    *,
    max_examples: int = 50,
    engines: Sequence[EngineName] = ("compiled",),
    resume: bool = True,
    seed: int | None = None,
) -> None:
    """Check that the callbacks ``factory()`` builds keep the lifecycle contract.

    ``factory`` is called once per fit, so every fit gets a fresh callback. First a
    deterministic sweep (74 examples: every legal decision, a stop and a raise of
    another callback at every event, alone); then ``max_examples`` random examples: run shapes,
    scripts of the other callbacks' decisions, stops and raises, an engine from
    ``engines`` and, with ``resume``, a checkpoint to resume from. ``seed`` fixes the
    random examples. Raises :class:`ConformanceError` naming the problem (a key of
    :data:`PROBLEMS`) with a snippet that reruns the smallest failing example found:
    shrunk by Hypothesis, or for a sweep example, the smallest shape that fails alike.
    """
    collect_hooks([factory()])  # a misspelled hook fails here, once
    engines = tuple(engines)

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        print_blob=False,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(example=_examples(engines, resume))
    def conforms(example: Example) -> None:
        check_example(factory, example)

    if seed is not None:
        conforms = hypothesis_seed(seed)(conforms)
    try:
        for example in sweep(engines, resume):
            try:
                check_example(factory, example)
            except ConformanceError as error:
                raise _smallest(factory, error) from None
        try:
            conforms()
        except FlakyFailure as flaky:
            raise _flaky(factory, flaky) from None
    except ConformanceError as error:
        # A fresh error: without the notes Hypothesis added, chained to the user's exception.
        fresh = ConformanceError(
            error.problem, error.detail, name=error.name, example=error.example,
            snippet=error.snippet,
        )  # fmt: skip
        raise fresh.with_traceback(None) from error.__cause__

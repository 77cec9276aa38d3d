"""The lifecycle machine against the contract's tables (written here from lifecycle.md)."""

from __future__ import annotations

from typing import Any

import helpers as h
import pytest
from helpers import BE, EE, FE, TE, VE, VS

from statemachine_loop import Callback, ConfigError, Event, TrainingLoop, lifecycle_diagram
from statemachine_loop.machine import (
    FINAL_STATE,
    INITIAL_STATE,
    REDIRECT_TARGETS,
    STATES,
    MachineModel,
    build_machine,
    transition_table,
    wind_down_paths,
)

CONTRACT_STATES = {
    "idle",
    "fit",
    "epoch",
    "training",
    "training_batch",
    "updating",
    "trained",
    "validation",
    "validation_batch",
    "predicted",
    "validated",
    "done",
}

#: From the contract: "from updating: batch_end, training_end, epoch_end, fit_end".
WIND_DOWN = {
    "idle": (),
    "fit": (FE,),
    "epoch": (EE, FE),
    "training": (TE, EE, FE),
    "training_batch": (BE, TE, EE, FE),
    "updating": (BE, TE, EE, FE),
    "trained": (EE, FE),
    "validation": (VE, EE, FE),
    "validation_batch": (BE, VE, EE, FE),
    "predicted": (BE, VE, EE, FE),
    "validated": (EE, FE),
    "done": (),
}


def _machine() -> Any:
    return build_machine(MachineModel())


def test_states_are_the_contracts() -> None:
    machine = _machine()
    assert set(machine.states) == CONTRACT_STATES == set(STATES)
    assert (INITIAL_STATE, FINAL_STATE) == ("idle", "done")
    assert machine.initial == "idle"


def test_transitions_are_the_contracts_table() -> None:
    assert transition_table(_machine()) == {
        (src, event): dst for (event, src), dst in h.CONTRACT_TABLE.items()
    }


def test_triggers_are_exactly_the_twelve_events() -> None:
    machine = _machine()
    assert set(machine.events) == {event.value for event in Event}
    assert len(Event) == 12


def test_no_auto_transitions_on_the_private_model() -> None:
    model = MachineModel()
    build_machine(model)
    names = set(dir(model))
    assert not {name for name in names if name.startswith("to_")}
    assert {state for state in CONTRACT_STATES if f"to_{state}" in names} == set()
    assert hasattr(model, "fit_start")  # the triggers are there


@pytest.mark.parametrize("engine", h.ENGINES)
def test_loop_drives_a_private_model(engine: str) -> None:
    model = h.make_model()
    loop = h.make_loop(engine, model)
    assert all(m is not loop for m in loop.machine.models)
    assert not any(name.startswith("to_") for m in loop.machine.models for name in dir(m))
    assert not hasattr(loop, "to_idle") and not hasattr(loop, "trigger")
    assert transition_table(loop.machine) == transition_table(_machine())


def test_done_is_final() -> None:
    machine = _machine()
    assert machine.get_state("done").final
    assert not any(machine.get_state(s).final for s in CONTRACT_STATES - {"done"})
    assert not [key for key in transition_table(machine) if key[0] == "done"]


def test_wind_down_paths_from_each_state() -> None:
    assert wind_down_paths(_machine()) == WIND_DOWN


def test_redirect_targets_are_legal_and_cover_the_contract() -> None:
    table = transition_table(_machine())
    for (state, proposed), targets in REDIRECT_TARGETS.items():
        assert (state, proposed) in table
        for target in targets:
            assert (state, target) in table, (state, proposed, target)
    for key, targets in h.CONTRACT_REDIRECTS.items():
        assert REDIRECT_TARGETS[key] == targets
    # One entry beyond the contract's table: validation proposed from epoch (training
    # was vetoed) may go to epoch_end, by the contract's general rule.
    extra = {key: v for key, v in REDIRECT_TARGETS.items() if key not in h.CONTRACT_REDIRECTS}
    assert extra == {("epoch", VS): (EE,)}


def test_mermaid_diagram_draws_every_transition() -> None:
    diagram = lifecycle_diagram("mermaid")
    lines = {line.strip() for line in diagram.splitlines()}
    drawn = {line for line in lines if "-->" in line and not line.startswith("[*]")}
    expected = {f"{src} --> {dst}: {event.value}" for (event, src), dst in h.CONTRACT_TABLE.items()}
    assert drawn == expected


def test_dot_diagram_names_every_event() -> None:
    pytest.importorskip("graphviz")
    diagram = lifecycle_diagram("dot")
    assert all(event.value in diagram for event in Event)


@pytest.mark.parametrize("fmt", ["svg", "", "Mermaid"])
def test_unknown_diagram_format_is_config_error(fmt: str) -> None:
    with pytest.raises(ConfigError) as info:
        lifecycle_diagram(fmt)  # type: ignore[arg-type]
    assert repr(fmt) in str(info.value) and "mermaid" in str(info.value)


class _WhereAmI(Callback):
    """Records the machine's state as each guard and observer sees it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Event, str, str]] = []
        for event in Event:
            setattr(self, f"guard_{event.value}", self._make("guard", event))
            setattr(self, f"on_{event.value}", self._make("on", event))

    def _make(self, kind: str, event: Event) -> Any:
        def hook(loop: TrainingLoop) -> None:
            self.seen.append((kind, event, loop.state, loop.machine.model.state))

        return hook


@pytest.mark.parametrize("engine", h.ENGINES)
def test_guards_see_the_source_and_observers_the_destination(engine: str) -> None:
    where, model = _WhereAmI(), h.make_model()
    loop = h.make_loop(engine, model, train=2, val=1, callbacks=[where])
    loop.fit(model, 2)
    expected = []
    for event, (src, dst) in zip(
        h.fit_trace(2, 2, 1), h.states_along(h.fit_trace(2, 2, 1)), strict=True
    ):
        expected += [("guard", event, src, src), ("on", event, dst, dst)]
    assert where.seen == expected

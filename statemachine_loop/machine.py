"""The lifecycle machine: one declarative table, built into a ``transitions`` machine.

This module is the single source of truth for legality. :data:`TRANSITIONS` lists
every transition of the lifecycle (trigger, sources, destination), exactly the table
of the lifecycle contract; :func:`build_machine` turns it into a
``transitions.Machine`` with auto transitions off and a private model object, and
everything else the loop needs about legality is *derived from that machine*:

* :func:`transition_table` — ``{(state, event): destination}`` for the compiled
  dispatcher's table lookups;
* :func:`wind_down_paths` — for each state, the shortest path of end events to
  ``done`` (breadth-first search over the machine's transitions);
* :func:`lifecycle_diagram` — a Mermaid (or DOT) diagram drawn by ``transitions``'
  own diagram extension.

:data:`REDIRECT_TARGETS` is the one piece of policy on top of legality: which legal
events the driver can actually perform when a guard redirects a proposal. Its
entries are checked against the machine when the module is imported.
"""

from __future__ import annotations

import collections
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from transitions import Machine

from statemachine_loop.events import END_EVENTS, TRAINING, VALIDATION, Event, Phase

__all__ = [
    "BETWEEN_EPOCHS",
    "FINAL_STATE",
    "INITIAL_STATE",
    "MachineModel",
    "PHASE_OF_STATE",
    "REDIRECT_TARGETS",
    "RESUMABLE_STATES",
    "STATES",
    "TRANSITIONS",
    "build_machine",
    "lifecycle_diagram",
    "transition_table",
    "wind_down_paths",
]

#: Where a loop is before ``fit`` and after ``reset``.
INITIAL_STATE: Final = "idle"
#: The final state; ``fit_end`` leads here and nothing leaves it.
FINAL_STATE: Final = "done"

#: Every state, a noun for where the loop is, in lifecycle order.
STATES: Final[tuple[str, ...]] = (
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
)

#: Inside ``fit``, between epochs: where every epoch starts and ends.
BETWEEN_EPOCHS: Final = "fit"

#: The phase each state lies in (a phase's own state is named after the phase: the
#: loop is there between two batches); states outside any phase are absent.
PHASE_OF_STATE: Final[Mapping[str, Phase]] = {
    TRAINING: TRAINING,
    "training_batch": TRAINING,
    "updating": TRAINING,
    VALIDATION: VALIDATION,
    "validation_batch": VALIDATION,
    "predicted": VALIDATION,
}

#: The states a checkpoint can be taken in: between epochs, or at a batch boundary
#: inside a phase (the phase's own state).
RESUMABLE_STATES: Final[tuple[str, ...]] = (BETWEEN_EPOCHS, TRAINING, VALIDATION)

#: The lifecycle's transitions: ``(event, sources, destination)``.
TRANSITIONS: Final[tuple[tuple[Event, tuple[str, ...], str], ...]] = (
    (Event.FIT_START, ("idle",), "fit"),
    (Event.EPOCH_START, ("fit",), "epoch"),
    (Event.TRAINING_START, ("epoch",), "training"),
    (Event.BATCH_START, ("training",), "training_batch"),
    (Event.BATCH_START, ("validation",), "validation_batch"),
    (Event.UPDATE_START, ("training_batch",), "updating"),
    (Event.INFERENCE_PREDICTION_END, ("validation_batch",), "predicted"),
    (Event.BATCH_END, ("updating", "training_batch"), "training"),
    (Event.BATCH_END, ("predicted", "validation_batch"), "validation"),
    (Event.TRAINING_END, ("training",), "trained"),
    (Event.VALIDATION_START, ("trained", "epoch"), "validation"),
    (Event.VALIDATION_END, ("validation",), "validated"),
    (Event.EPOCH_END, ("trained", "validated", "epoch"), "fit"),
    (Event.FIT_END, ("fit",), "done"),
)

#: Where a guard may redirect a proposal: ``(state, proposed event) -> targets``.
#: ``validation_start`` is a target only when the loop has validation data.
#: ``epoch (validation_start) -> epoch_end`` follows the contract's general rule
#: ("an event legal from the current state that the loop can actually perform")
#: for the case where training was skipped and validation is proposed from ``epoch``.
REDIRECT_TARGETS: Final[Mapping[tuple[str, Event], tuple[Event, ...]]] = {
    ("fit", Event.EPOCH_START): (Event.FIT_END,),
    ("epoch", Event.TRAINING_START): (Event.VALIDATION_START, Event.EPOCH_END),
    ("epoch", Event.VALIDATION_START): (Event.EPOCH_END,),
    ("training", Event.BATCH_START): (Event.TRAINING_END,),
    ("training_batch", Event.UPDATE_START): (Event.BATCH_END,),
    ("trained", Event.VALIDATION_START): (Event.EPOCH_END,),
    ("validation", Event.BATCH_START): (Event.VALIDATION_END,),
    ("validation_batch", Event.INFERENCE_PREDICTION_END): (Event.BATCH_END,),
}


class MachineModel:
    """The private model object the machine drives: it holds only ``state``.

    The loop never gives ``transitions`` a public object, so generated trigger
    methods cannot clash with real attributes (``transitions`` would then skip them
    with only a warning).
    """

    state: str

    def __repr__(self) -> str:
        return f"MachineModel(state={getattr(self, 'state', None)!r})"


def _machine_kwargs(model: object) -> dict[str, Any]:
    states: list[Any] = [
        {"name": name, "final": True} if name == FINAL_STATE else name for name in STATES
    ]
    return {
        "model": model,
        "states": states,
        "transitions": [
            {"trigger": event.value, "source": list(sources), "dest": dest}
            for event, sources, dest in TRANSITIONS
        ],
        "initial": INITIAL_STATE,
        "auto_transitions": False,
        "send_event": False,
    }


def build_machine(
    model: object,
    *,
    condition: Callable[[Event], bool] | None = None,
    after: Callable[[Event], None] | None = None,
) -> Machine:
    """Build the lifecycle machine around ``model``, a private object of the loop.

    ``condition`` and ``after``, when given, become every transition's
    ``conditions`` and ``after`` callbacks, called with the :class:`Event` passed to
    ``trigger``: the reference engine uses them to run guards and observers
    through ``transitions`` itself. The machine never logs on
    the hot path: the compiled dispatcher does not call it per event.
    """
    kwargs = _machine_kwargs(model)
    if condition is not None or after is not None:
        for spec in kwargs["transitions"]:
            if condition is not None:
                spec["conditions"] = [condition]
            if after is not None:
                spec["after"] = [after]
    return Machine(**kwargs)


def transition_table(machine: Machine) -> dict[tuple[str, Event], str]:
    """Read ``{(source, event): destination}`` off a built machine."""
    table: dict[tuple[str, Event], str] = {}
    for trigger, machine_event in machine.events.items():
        for source, transitions in machine_event.transitions.items():
            for transition in transitions:
                if transition.dest is not None:
                    table[(source, Event(trigger))] = transition.dest
    return table


def wind_down_paths(machine: Machine) -> dict[str, tuple[Event, ...]]:
    """For each state, the shortest sequence of end events that reaches ``done``.

    Computed by breadth-first search backwards from the final state over the
    machine's end-event transitions, so the wind-down follows the machine, not a
    hand-kept list. ``idle`` has no such path (nothing was opened): empty tuple.
    """
    table = transition_table(machine)
    incoming: dict[str, list[tuple[str, Event]]] = collections.defaultdict(list)
    for (source, event), dest in table.items():
        if event in END_EVENTS:
            incoming[dest].append((source, event))
    paths: dict[str, tuple[Event, ...]] = {FINAL_STATE: ()}
    queue = collections.deque([FINAL_STATE])
    while queue:
        dest = queue.popleft()
        for source, event in incoming[dest]:
            if source not in paths:
                paths[source] = (event, *paths[dest])
                queue.append(source)
    paths.setdefault(INITIAL_STATE, ())
    return paths


def _check_redirect_targets() -> None:
    table = transition_table(build_machine(MachineModel()))
    for (state, proposed), targets in REDIRECT_TARGETS.items():
        if (state, proposed) not in table:
            raise AssertionError(f"redirect entry for {proposed} from {state!r} is not legal")
        for target in targets:
            if (state, target) not in table:
                raise AssertionError(f"redirect target {target} from {state!r} is not legal")


_check_redirect_targets()


def lifecycle_diagram(fmt: Literal["mermaid", "dot"] = "mermaid") -> str:
    """Return the lifecycle diagram, drawn by ``transitions`` from the machine itself.

    ``"mermaid"`` needs nothing extra; ``"dot"`` needs the ``graphviz`` Python
    package (the ``diagrams`` extra). The diagram is generated, never hand-drawn, so
    it cannot drift from the machine the loop runs.
    """
    from transitions.extensions import GraphMachine

    from statemachine_loop.errors import ConfigError, MissingDependencyError

    if fmt not in ("mermaid", "dot"):
        raise ConfigError(f"fmt must be 'mermaid' or 'dot', got {fmt!r}.")
    # transitions quietly falls back to mermaid without graphviz; say so instead.
    if fmt == "dot" and importlib.util.find_spec("graphviz") is None:
        raise MissingDependencyError(
            "The DOT diagram needs the graphviz Python package; install it with "
            "pip install 'statemachine-loop[diagrams]' (or pip install graphviz)."
        )
    engine: Literal["mermaid", "graphviz"] = "mermaid" if fmt == "mermaid" else "graphviz"
    kwargs = _machine_kwargs(MachineModel())
    graph = GraphMachine(**kwargs, graph_engine=engine, title="statemachine_loop lifecycle")
    drawn = graph.get_graph()
    if fmt == "mermaid":
        return str(drawn.draw(None))
    return str(drawn.source)
